"""Layers that combine several bottoms into one top: ``Concat`` (concat_param) and ``Eltwise``
(eltwise_param). A single-bottom Concat is a view of its bottom, as in ``structural``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, register_layer
from engine.layers.structural import canonical_axis, copy_unless_shared, no_in_place, share_view

PROD, SUM, MAX = 0, 1, 2  # caffe.EltwiseParameter.EltwiseOp


@register_layer
class Concat(Layer):
    """Joins the bottoms along ``concat_param.axis`` (default 1; legacy ``concat_dim``).

    Shapes: all bottoms equal except along the axis; the top's axis is the sum. With a single
    bottom the top is a view of it, as in Caffe.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (1, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("give either concat_param.axis or the legacy concat_dim, not both")
        self.legacy_dim = int(p.concat_dim) if p.HasField("concat_dim") else None
        self.axis_param = int(p.axis)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        no_in_place(self, bottom, top)
        first = bottom[0]
        if self.legacy_dim is not None:
            if self.legacy_dim >= first.num_axes:
                raise self.error(f"concat_dim {self.legacy_dim} is out of range for the "
                                 f"{first.num_axes}-d bottom {first.shape}")
            self.axis = self.legacy_dim
        else:
            self.axis = canonical_axis(self, first, self.axis_param, "concat_param.axis")
        ax = self.axis
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != first.num_axes or any(
                    b.shape[j] != first.shape[j] for j in range(first.num_axes) if j != ax):
                raise self.error(f"all bottoms must have the same shape except along axis "
                                 f"{ax}: bottom 0 is {first.shape}, bottom {i} is {b.shape}")
        if len(bottom) == 1:
            share_view(top[0], first, first.shape)
            return
        shape = list(first.shape)
        shape[ax] = sum(b.shape[ax] for b in bottom)
        top[0].reshape(shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        if len(bottom) == 1:
            copy_unless_shared(top[0].data, bottom[0].data)
            return
        np.concatenate([b.data for b in bottom], axis=self.axis, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if len(bottom) == 1:
            if propagate_down[0]:
                copy_unless_shared(bottom[0].diff, top[0].diff)
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
        # only PROD's gradient reads values (the other bottoms, or y / x_i)
        self.backward_needs_bottom_data = self.op == PROD
        self.backward_needs_top_data = self.op == PROD

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
