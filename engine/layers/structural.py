"""Layers that move or combine blobs without learning anything: ``Split``, ``Flatten``
(flatten_param), ``Reshape`` (reshape_param), ``Concat`` (concat_param) and ``Eltwise``
(eltwise_param).

Flatten, Reshape and single-bottom Concat make the top's data and diff reshaped *views* of the
bottom's, as Caffe's ShareData/ShareDiff do, so forward and backward move no memory. They
re-create the views on every reshape and, should a view have been broken since (a blob
reallocated), fall back to a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, register_layer

PROD, SUM, MAX = 0, 1, 2  # caffe.EltwiseParameter.EltwiseOp


def _share_view(top: Blob, bottom: Blob, shape: Sequence[int]) -> None:
    """Make ``top`` a reshaped view of ``bottom``'s data and diff (Caffe's ShareData/ShareDiff)."""
    top.data = bottom.data.reshape(shape)
    top.diff = bottom.diff.reshape(shape)


def _copy_unless_shared(dst: np.ndarray, src: np.ndarray) -> None:
    if not np.may_share_memory(dst, src):
        dst[...] = src.reshape(dst.shape)


def _no_in_place(layer: Layer, bottom: list[Blob], top: list[Blob]) -> None:
    if any(t is b for t in top for b in bottom):
        raise layer.error("does not allow in-place computation (a top is also a bottom)")


def _canonical(layer: Layer, blob: Blob, axis: int, field: str) -> int:
    try:
        return blob.canonical_axis(axis)
    except ValueError as exc:
        raise layer.error(f"{field}: {exc}") from None


class _ViewLayer(Layer):
    """One bottom, one top that is a reshaped view of it; subclasses give the top shape."""

    def top_shape(self, bottom: Blob) -> tuple[int, ...]:
        raise NotImplementedError

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        _no_in_place(self, bottom, top)
        shape = self.top_shape(bottom[0])
        if int(np.prod(shape, dtype=np.int64)) != bottom[0].count:
            raise self.error(f"output count must match input count: bottom {bottom[0].shape} "
                             f"has {bottom[0].count}, top {shape} would have "
                             f"{int(np.prod(shape, dtype=np.int64))}")
        _share_view(top[0], bottom[0], shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        _copy_unless_shared(top[0].data, bottom[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            _copy_unless_shared(bottom[0].diff, top[0].diff)


@register_layer
class Split(Layer):
    """Hands one bottom to several consumers: every top is a view of the bottom's data.

    Backward: bottom diff = sum of the top diffs (each top keeps its own diff). The Net inserts
    these itself (``<blob>_<layer>_<i>_split``). Shape: every top like the bottom.
    """

    n_top = (1, None)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        _no_in_place(self, bottom, top)
        for t in top:
            t.reshape(bottom[0].shape)
            t.share_data(bottom[0])

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        for t in top:
            _copy_unless_shared(t.data, bottom[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        if len(top) == 1:
            dx[...] = top[0].diff
            return
        np.add(top[0].diff, top[1].diff, out=dx)
        for t in top[2:]:
            dx += t.diff


@register_layer
class Flatten(_ViewLayer):
    """Merges axes ``axis``..``end_axis`` (inclusive, default 1..-1) into one.

    Shape: (N, C, H, W) -> (N, C*H*W) by default. The top is a view of the bottom (data and
    diff); in place is not allowed, as in Caffe.
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.flatten_param
        self.axis = int(p.axis)
        self.end_axis = int(p.end_axis)

    def top_shape(self, bottom: Blob) -> tuple[int, ...]:
        start = _canonical(self, bottom, self.axis, "flatten_param.axis")
        end = _canonical(self, bottom, self.end_axis, "flatten_param.end_axis")
        if end < start:
            raise self.error(f"flatten_param.end_axis ({self.end_axis} -> {end}) comes before "
                             f"axis ({self.axis} -> {start}) for bottom shape {bottom.shape}")
        shape = bottom.shape
        return (*shape[:start], bottom.count_axes(start, end + 1), *shape[end + 1:])


@register_layer
class Reshape(_ViewLayer):
    """Gives the bottom a new shape without touching the values.

    ``reshape_param.shape`` replaces the bottom axes ``axis`` .. ``axis + num_axes`` (default:
    all of them); a dim 0 copies the bottom's dim at that position, one dim may be -1 and is
    inferred from the count. A negative ``axis`` counts from the end with -1 meaning *after*
    the last axis (Caffe's rule for this layer). Shape: e.g. (2, 3, 4) with shape {0, -1} ->
    (2, 12). The top is a view of the bottom; in place is not allowed.
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        self.axis = int(p.axis)
        self.num_axes = int(p.num_axes)
        self.copy_axes = [i for i, d in enumerate(self.dims) if d == 0]
        inferred = [i for i, d in enumerate(self.dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"reshape_param.shape {self.dims} has more than one -1 dim; at "
                             f"most one dim can be inferred")
        if any(d < -1 for d in self.dims):
            raise self.error(f"reshape_param.shape {self.dims}: dims must be >= -1")
        if self.num_axes < -1:
            raise self.error(f"reshape_param.num_axes must be >= 0, or -1 for all; "
                             f"got {self.num_axes}")
        self.inferred_axis = inferred[0] if inferred else None
        self.constant_count = int(np.prod([d for d in self.dims if d > 0], dtype=np.int64))

    def top_shape(self, bottom: Blob) -> tuple[int, ...]:
        n = bottom.num_axes
        start = self.axis if self.axis >= 0 else n + self.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"reshape_param.axis {self.axis} is out of range for the "
                             f"{n}-d bottom {bottom.shape}")
        end = n if self.num_axes == -1 else start + self.num_axes
        if end > n:
            raise self.error(f"reshape_param.axis + num_axes = {end} is past the last axis of "
                             f"the {n}-d bottom {bottom.shape}")
        new = list(self.dims)
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(f"reshape_param.shape {self.dims} has a 0 at position {i} but "
                                 f"the bottom {bottom.shape} has no axis {start + i} to copy")
            new[i] = bottom.shape[start + i]
        if self.inferred_axis is not None:
            known = self.constant_count * bottom.count_axes(0, start) * bottom.count_axes(end)
            known *= int(np.prod([new[i] for i in self.copy_axes], dtype=np.int64))
            if known == 0 or bottom.count % known:
                raise self.error(f"cannot infer the -1 dim of {self.dims}: bottom count "
                                 f"{bottom.count} ({bottom.shape}) is not divisible by the "
                                 f"product of the other dims ({known})")
            new[self.inferred_axis] = bottom.count // known
        return (*bottom.shape[:start], *new, *bottom.shape[end:])


@register_layer
class Concat(Layer):
    """Joins the bottoms along ``concat_param.axis`` (default 1; legacy ``concat_dim``).

    Shapes: all bottoms equal except along the axis; the top's axis is the sum. With a single
    bottom the top is a view of it, as in Caffe.
    """

    n_bottom = (1, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("give either concat_param.axis or the legacy concat_dim, not both")
        self.legacy_dim = int(p.concat_dim) if p.HasField("concat_dim") else None
        self.axis_param = int(p.axis)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        _no_in_place(self, bottom, top)
        first = bottom[0]
        if self.legacy_dim is not None:
            if self.legacy_dim >= first.num_axes:
                raise self.error(f"concat_dim {self.legacy_dim} is out of range for the "
                                 f"{first.num_axes}-d bottom {first.shape}")
            self.axis = self.legacy_dim
        else:
            self.axis = _canonical(self, first, self.axis_param, "concat_param.axis")
        ax = self.axis
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != first.num_axes or any(
                    b.shape[j] != first.shape[j] for j in range(first.num_axes) if j != ax):
                raise self.error(f"all bottoms must have the same shape except along axis "
                                 f"{ax}: bottom 0 is {first.shape}, bottom {i} is {b.shape}")
        if len(bottom) == 1:
            _share_view(top[0], first, first.shape)
            return
        shape = list(first.shape)
        shape[ax] = sum(b.shape[ax] for b in bottom)
        top[0].reshape(shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        if len(bottom) == 1:
            _copy_unless_shared(top[0].data, bottom[0].data)
            return
        np.concatenate([b.data for b in bottom], axis=self.axis, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if len(bottom) == 1:
            if propagate_down[0]:
                _copy_unless_shared(bottom[0].diff, top[0].diff)
            return
        lead = (slice(None),) * self.axis
        offset = 0
        for b, down in zip(bottom, propagate_down, strict=False):
            size = b.shape[self.axis]
            if down:
                b.diff[...] = top[0].diff[(*lead, slice(offset, offset + size))]
            offset += size


@register_layer
class Eltwise(Layer):
    """Combines same-shaped bottoms elementwise: PROD, SUM (default) or MAX.

    SUM: y = sum_i coeff_i x_i (coeff defaults to 1; one per bottom). PROD: y = prod_i x_i; its
    gradient to x_i is the product of the *other* bottoms (``stable_prod_grad``, default) or
    y / x_i. MAX: the gradient goes to the bottom that gave the max. Ties follow Caffe's CPU
    code: between bottoms 0 and 1 bottom 1 wins; a later bottom must be strictly greater.
    Shape: top like the bottoms (at least two).
    """

    n_bottom = (2, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.eltwise_param
        self.op = int(p.operation)
        if p.coeff and len(p.coeff) != len(bottom):
            raise self.error(f"eltwise_param.coeff needs one coefficient per bottom: "
                             f"{len(bottom)} bottoms, {len(p.coeff)} coefficients")
        if p.coeff and self.op != SUM:
            raise self.error("eltwise_param.coeff is only allowed with operation SUM")
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * len(bottom)
        self.stable_prod_grad = bool(p.stable_prod_grad)
        self._argmax: np.ndarray | None = None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.error(f"all bottoms must have the same shape: bottom 0 is "
                                 f"{bottom[0].shape}, bottom {i} is {b.shape}")
        if self.op == PROD and any(top[0] is b for b in bottom):
            raise self.error("PROD does not allow in-place computation: backward needs the "
                             "bottoms' data")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        xs = [b.data for b in bottom]
        # in place, work aside so bottom 0 is not overwritten while still being read
        in_place = any(top[0] is b for b in bottom)
        y = np.empty_like(xs[0]) if in_place else top[0].data
        if self.op == SUM:
            np.multiply(xs[0], self.coeffs[0], out=y)
            for x, c in zip(xs[1:], self.coeffs[1:], strict=True):
                y += x if c == 1.0 else x * c
        elif self.op == PROD:
            np.multiply(xs[0], xs[1], out=y)
            for x in xs[2:]:
                y *= x
        else:
            # Caffe: bottom 0 wins over bottom 1 only if strictly greater
            first = xs[0] > xs[1]
            np.copyto(y, xs[1])
            np.copyto(y, xs[0], where=first)
            argmax = np.logical_not(first).astype(np.int32)
            for i, x in enumerate(xs[2:], 2):
                better = x > y
                np.copyto(y, x, where=better)
                argmax[better] = i
            self._argmax = argmax
        if in_place:
            top[0].data[...] = y

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        dy = top[0].diff
        # handle bottom 0 last: in place, its diff is the top diff the others still need
        for i in reversed(range(len(bottom))):
            if propagate_down[i]:
                bottom[i].diff[...] = self._bottom_grad(i, dy, top[0].data, bottom)

    def _bottom_grad(self, i: int, dy: np.ndarray, y: np.ndarray,
                     bottom: list[Blob]) -> np.ndarray:
        if self.op == SUM:
            return dy if self.coeffs[i] == 1.0 else dy * self.coeffs[i]
        if self.op == MAX:
            return dy * (self._argmax == i)
        if not self.stable_prod_grad:
            return y / bottom[i].data * dy
        others = [b.data for j, b in enumerate(bottom) if j != i]
        grad = others[0].copy()
        for x in others[1:]:
            grad *= x
        return grad * dy
