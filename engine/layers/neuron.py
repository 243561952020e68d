"""Elementwise neuron layers: ``ReLU`` (relu_param), ``Sigmoid`` (sigmoid_param), ``TanH``
(tanh_param) and ``Dropout`` (dropout_param).

All take one bottom and one top of the same shape and are safe in place (``top[0] is
bottom[0]``): backward reads only what survives an in-place forward (the top data or a mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import TRAIN, NeuronLayer, register_layer
from engine.parallel import for_batch_chunks


@register_layer
class ReLU(NeuronLayer):
    """y = max(x, 0) + negative_slope * min(x, 0); dy/dx = 1 where x > 0, else negative_slope.

    Shape: any, top like bottom. As in Caffe the gradient at x == 0 is the slope side. In place
    with a slope >= 0, sign(y) tells sign(x); with a negative slope it does not, so forward keeps
    the mask of x > 0 for that case only.
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.slope = float(self.param.relu_param.negative_slope)
        self._positive: np.ndarray | None = None
        self.keeps_bottom_in_place = self.slope < 0  # the mask; else backward reads sign(y)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        if self.slope < 0 and top[0] is bottom[0]:
            self._positive = x > 0
        else:
            self._positive = None
        if self.slope == 0:
            x2, y2 = _rows(x), _rows(y)
            for_batch_chunks(lambda a, b: np.maximum(x2[a:b], 0, out=y2[a:b]), *x2.shape)
        else:
            y[...] = np.where(x > 0, x, x * self.slope)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        # out of place this is x; in place it is y, whose sign matches x's when slope >= 0
        dy, dx = top[0].diff, bottom[0].diff
        if self.slope == 0:
            x2, dy2, dx2 = _rows(bottom[0].data), _rows(dy), _rows(dx)
            for_batch_chunks(lambda a, b: np.multiply(dy2[a:b], x2[a:b] > 0, out=dx2[a:b]),
                             *x2.shape)
            return
        positive = self._positive if self._positive is not None else bottom[0].data > 0
        one, slope = dx.dtype.type(1), dx.dtype.type(self.slope)
        np.multiply(dy, np.where(positive, one, slope), out=dx)


def _rows(array: np.ndarray) -> np.ndarray:
    """A blob array as (batch, rest): the view that parallel chunks split (one row if 0-d)."""
    n = array.shape[0] if array.ndim else 1
    return array.reshape(n, array.size // n if n else 0)


@register_layer
class Sigmoid(NeuronLayer):
    """y = 1 / (1 + exp(-x)), computed as 0.5 * tanh(0.5 x) + 0.5 (Caffe's form, no overflow).

    dy/dx = y (1 - y), from the top data. Shape: any, top like bottom.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = True

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        y = top[0].data
        np.multiply(bottom[0].data, 0.5, out=y)
        np.tanh(y, out=y)
        y *= 0.5
        y += 0.5

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        y = top[0].data
        one_minus_y = 1 - y
        dx = bottom[0].diff
        np.multiply(top[0].diff, y, out=dx)
        dx *= one_minus_y


@register_layer
class TanH(NeuronLayer):
    """y = tanh(x); dy/dx = 1 - y^2, from the top data. Shape: any, top like bottom."""

    backward_needs_bottom_data = False
    backward_needs_top_data = True

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        np.tanh(bottom[0].data, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        y = top[0].data
        local = 1 - y * y
        np.multiply(top[0].diff, local, out=bottom[0].diff)


@register_layer
class Dropout(NeuronLayer):
    """Inverted dropout. TRAIN: mask ~ Bernoulli(1 - r), y = x * mask / (1 - r); TEST: y = x.

    r is ``dropout_ratio``. Backward scales by the same mask (TRAIN) or copies (TEST). The mask
    is drawn from ``self.rng`` on every TRAIN forward. The SegNet/ENet forks'
    ``sample_weights_test: true`` drops in TEST as in TRAIN (Bayesian SegNet's Monte Carlo
    dropout). Shape: any, top like bottom.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1); got {self.ratio}")
        self._scaled_mask: np.ndarray | None = None
        self.drops = self.phase == TRAIN or self.param.dropout_param.sample_weights_test

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        if not self.drops:
            if top[0] is not bottom[0]:
                y[...] = x
            return
        # float32 draws whatever the blob dtype: the same mask in float32 nets and float64 checks
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.ratio
        scale = 1.0 / (1.0 - self.ratio)
        # mask * scale is exactly 0 or scale, so x * it equals Caffe's x * mask * scale
        self._scaled_mask = keep.astype(x.dtype)
        self._scaled_mask *= scale
        np.multiply(x, self._scaled_mask, out=y)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if not self.drops:
            if top[0] is not bottom[0]:
                dx[...] = dy
            return
        if self._scaled_mask is None or self._scaled_mask.shape != dy.shape:
            raise self.error("backward called before a dropping forward on this shape")
        np.multiply(dy, self._scaled_mask, out=dx)
