"""Small layers that Caffe ports of published models add: ``ReLU6`` (MobileNet v2 ports, no
parameters) and ``Axpy`` (SENet, hujie-frank/SENet, no parameters)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, NeuronLayer, register_layer


@register_layer
class ReLU6(NeuronLayer):
    """y = min(max(x, 0), 6), MobileNet v2 ports' activation.

    dy/dx = 1 where 0 < x < 6 (both ends excluded, as the ports' ``relu6_layer.cpp``), else 0.
    Safe in place: 0 < y < 6 exactly where 0 < x < 6. Shape: any.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = True

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        np.minimum(np.maximum(bottom[0].data, 0), 6, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            y = top[0].data
            np.multiply(top[0].diff, (y > 0) & (y < 6), out=bottom[0].diff)


@register_layer
class Axpy(Layer):
    """top = a * x + y: SENet's channel reweighting plus shortcut, in one layer.

    Bottoms a (N, C) or (N, C, 1, 1), x and y (N, C, H, W); a is broadcast over (H, W).

    Gradients: ``da = sum over (H, W) of dtop * x``, ``dx = a * dtop``, ``dy = dtop``, each
    under its own ``propagate_down`` (the port tests propagate_down[0] where it means [1]).
    Shapes: top like x.
    """

    n_bottom = (3, 3)
    backward_needs_top_data = False

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        a, x, y = (b.shape for b in bottom)
        if a[:2] != x[:2] or (len(a) == 4 and a[2:] != (1, 1)) or len(a) not in (2, 4):
            raise self.error(f"bottom 0 (the scale) must be (N, C) or (N, C, 1, 1) with "
                             f"bottom 1's N and C; got {a} against {x}")
        if x != y:
            raise self.error(f"bottoms 1 and 2 must have the same shape; got {x} and {y}")
        top[0].reshape(x)

    def _scale(self, bottom: list[Blob]) -> np.ndarray:
        a = bottom[0].data
        return a.reshape(*a.shape[:2], *(1,) * (bottom[1].num_axes - 2))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        np.add(self._scale(bottom) * bottom[1].data, bottom[2].data, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        dtop = top[0].diff
        if propagate_down[0]:
            per_plane = (dtop * bottom[1].data).reshape(*dtop.shape[:2], -1).sum(axis=2)
            bottom[0].diff[...] = per_plane.reshape(bottom[0].shape)
        if propagate_down[1]:
            np.multiply(dtop, self._scale(bottom), out=bottom[1].diff)
        if propagate_down[2]:
            np.copyto(bottom[2].diff, dtop)
