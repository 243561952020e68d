"""Layers that move blobs without learning anything: ``Split``, ``Flatten`` (flatten_param) and
``Reshape`` (reshape_param). Concat and Eltwise, which combine bottoms, are in ``combine``.

Flatten, Reshape (and single-bottom Concat) make the top's data and diff reshaped *views* of the
bottom's, as Caffe's ShareData/ShareDiff do, so forward and backward move no memory. They
re-create the views on every reshape and, should a view have been broken since (a blob
reallocated), fall back to a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, register_layer


def share_view(top: Blob, bottom: Blob, shape: Sequence[int]) -> None:
    """Make ``top`` a reshaped view of ``bottom``'s data and diff (Caffe's ShareData/ShareDiff)."""
    top.data = bottom.data.reshape(shape)
    top.view_diff_of(bottom)  # created only if a backward uses it


def copy_unless_shared(dst: np.ndarray, src: np.ndarray) -> None:
    if not np.may_share_memory(dst, src):
        dst[...] = src.reshape(dst.shape)


def no_in_place(layer: Layer, bottom: list[Blob], top: list[Blob]) -> None:
    if any(t is b for t in top for b in bottom):
        raise layer.error("does not allow in-place computation (a top is also a bottom)")


def canonical_axis(layer: Layer, blob: Blob, axis: int, field: str) -> int:
    try:
        return blob.canonical_axis(axis)
    except ValueError as exc:
        raise layer.error(f"{field}: {exc}") from None


class _ViewLayer(Layer):
    """One bottom, one top that is a reshaped view of it; subclasses give the top shape."""

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def top_shape(self, bottom: Blob) -> tuple[int, ...]:
        raise NotImplementedError

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        no_in_place(self, bottom, top)
        shape = self.top_shape(bottom[0])
        if int(np.prod(shape, dtype=np.int64)) != bottom[0].count:
            raise self.error(f"output count must match input count: bottom {bottom[0].shape} "
                             f"has {bottom[0].count}, top {shape} would have "
                             f"{int(np.prod(shape, dtype=np.int64))}")
        share_view(top[0], bottom[0], shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        copy_unless_shared(top[0].data, bottom[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            copy_unless_shared(bottom[0].diff, top[0].diff)


@register_layer
class Split(Layer):
    """Hands one bottom to several consumers: every top is a view of the bottom's data.

    Backward: bottom diff = sum of the top diffs (each top keeps its own diff). The Net inserts
    these itself (``<blob>_<layer>_<i>_split``). Shape: every top like the bottom.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_top = (1, None)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        no_in_place(self, bottom, top)
        for t in top:
            t.reshape(bottom[0].shape)
            t.share_data(bottom[0])

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        for t in top:
            copy_unless_shared(t.data, bottom[0].data)

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
        start = canonical_axis(self, bottom, self.axis, "flatten_param.axis")
        end = canonical_axis(self, bottom, self.end_axis, "flatten_param.end_axis")
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
