"""Broadcast affine layers: ``Scale`` (scale_param) and ``Bias`` (bias_param).

Both apply a blob b (learned, or a second bottom that replaces it) along the axes
``axis .. axis + b.num_axes - 1`` of bottom 0, broadcast over the axes before and after: bottom 0
is read as (outer, dim, inner) with dim = b.count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine import caffe_pb2
from engine.blob import Blob
from engine.layer import Layer, register_layer


def _axis(layer: Layer, bottom: Blob, axis: int, what: str) -> int:
    try:
        return bottom.canonical_axis(axis)
    except ValueError as exc:
        raise layer.error(f"{what}_param.axis: {exc}") from None


def _param_shape(layer: Layer, bottom: Blob, axis: int, num_axes: int,
                 what: str) -> tuple[int, ...]:
    """The learned blob's shape: bottom.shape[axis : axis + num_axes] (num_axes -1: to the end)."""
    start = _axis(layer, bottom, axis, what)
    if num_axes < -1:
        raise layer.error(f"{what}_param.num_axes must be >= 0, or -1 for all remaining axes; "
                          f"got {num_axes}")
    end = bottom.num_axes if num_axes == -1 else start + num_axes
    if end > bottom.num_axes:
        raise layer.error(f"{what}_param: axis {start} + num_axes {num_axes} extends past the "
                          f"{bottom.num_axes} axes of bottom 0 (shape {bottom.shape})")
    return bottom.shape[start:end]


def _broadcast_dims(layer: Layer, bottom: Blob, operand: Blob, axis: int,
                    what: str) -> tuple[int, int, int]:
    """(outer, dim, inner) for applying ``operand`` to ``bottom`` from ``axis`` on, as Caffe."""
    # a scalar operand applies anywhere; Caffe then uses axis 0 (outer == 1)
    start = 0 if operand.num_axes == 0 else _axis(layer, bottom, axis, what)
    end = start + operand.num_axes
    if bottom.shape[start:end] != operand.shape:
        raise layer.error(f"the {what} blob's shape {operand.shape} does not match bottom 0's "
                          f"axes {start}..{end - 1} (bottom 0 has shape {bottom.shape})")
    return bottom.count_axes(0, start), operand.count, bottom.count_axes(end)


def _sum_to_dim(a: np.ndarray) -> np.ndarray:
    """Sum an (outer, dim, inner) array over outer and inner."""
    return a.sum(axis=2).sum(axis=0)


@register_layer
class Scale(Layer):
    """y = x * s (+ b when ``bias_term``), s broadcast from ``axis`` over ``num_axes`` axes.

    s is learned, shape ``bottom.shape[axis : axis + num_axes]`` (num_axes -1: all remaining
    axes; ``filler`` defaults to constant 1), or is bottom 1, whose shape then decides.
    The bias b (``bias_filler``, default constant 0) has the shape of s. Blobs: [s, b] with one
    bottom, [b] with two. Gradients: dx = dy * s; ds = sum(dy * x); db = sum(dy), over the
    broadcast axes. Shapes: top like bottom 0; safe in place.
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False
    keeps_bottom_in_place = True

    n_bottom = (1, 2)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.scale_param
        self.axis, self.bias_term = int(p.axis), bool(p.bias_term)
        specs: list[tuple[Sequence[int], object]] = []
        if len(bottom) == 1:
            shape = _param_shape(self, bottom[0], self.axis, int(p.num_axes), "scale")
            filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(
                type="constant", value=1)
            specs.append((shape, filler))
        if self.bias_term:
            num_axes = bottom[1].num_axes if len(bottom) > 1 else int(p.num_axes)
            shape = _param_shape(self, bottom[0], self.axis, num_axes, "scale")
            specs.append((shape, p.bias_filler))
        self.init_param_blobs(specs)
        self._saved_x: np.ndarray | None = None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        scale = bottom[1] if len(bottom) > 1 else self.blobs[0]
        self.dims = _broadcast_dims(self, bottom[0], scale, self.axis, "scale")
        if self.bias_term:
            _broadcast_dims(self, bottom[0], self.blobs[-1], self.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def _scale(self, bottom: list[Blob]) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data.reshape(self.dims)
        # in place the top overwrites x, which the scale's gradient needs
        self._saved_x = x.copy() if top[0] is bottom[0] else None
        y = top[0].data.reshape(self.dims)
        np.multiply(x, self._scale(bottom).data.reshape(-1, 1), out=y)
        if self.bias_term:
            y += self.blobs[-1].data.reshape(-1, 1)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        dy = top[0].diff.reshape(self.dims)
        learned = len(bottom) == 1
        # parameter and bottom-1 gradients first: in place, bottom 0's diff overwrites dy
        if self.bias_term and self.param_down(len(self.blobs) - 1):
            self.blobs[-1].diff += _sum_to_dim(dy).reshape(self.blobs[-1].shape)
        scale = self._scale(bottom)
        wants_scale_grad = self.param_down(0) if learned else propagate_down[1]
        if wants_scale_grad:
            x = self._saved_x if self._saved_x is not None else bottom[0].data.reshape(self.dims)
            grad = _sum_to_dim(dy * x).reshape(scale.shape)
            if learned:
                scale.diff += grad
            else:
                scale.diff[...] = grad
        if propagate_down[0]:
            np.multiply(dy, scale.data.reshape(-1, 1), out=bottom[0].diff.reshape(self.dims))


@register_layer
class Bias(Layer):
    """y = x + b, b broadcast from ``axis`` over ``num_axes`` axes.

    b is learned, shape ``bottom.shape[axis : axis + num_axes]`` (num_axes -1: all remaining
    axes; ``filler`` defaults to constant 0), or is bottom 1, whose shape then decides.
    Gradients: dx = dy; db = sum(dy) over the broadcast axes. Shapes: top like bottom 0; safe in
    place.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (1, 2)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.bias_param
        self.axis = int(p.axis)
        if len(bottom) == 1:
            shape = _param_shape(self, bottom[0], self.axis, int(p.num_axes), "bias")
            self.init_param_blobs([(shape, p.filler)])

    def _bias(self, bottom: list[Blob]) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.dims = _broadcast_dims(self, bottom[0], self._bias(bottom), self.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        np.add(bottom[0].data.reshape(self.dims), self._bias(bottom).data.reshape(-1, 1),
               out=top[0].data.reshape(self.dims))

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        dy = top[0].diff
        bias = self._bias(bottom)
        if len(bottom) == 1 and self.param_down(0):
            bias.diff += _sum_to_dim(dy.reshape(self.dims)).reshape(bias.shape)
        elif len(bottom) > 1 and propagate_down[1]:
            bias.diff[...] = _sum_to_dim(dy.reshape(self.dims)).reshape(bias.shape)
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = dy
