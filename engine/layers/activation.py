"""More elementwise neuron layers: ``PReLU`` (prelu_param), ``ELU`` (elu_param), ``AbsVal``,
``BNLL``, ``Power`` (power_param), ``Exp`` (exp_param), ``Log`` (log_param), ``Threshold``
(threshold_param), ``Clip`` (clip_param) and ``Swish`` (swish_param).

All take one bottom and one top of the same shape. Every one but AbsVal (which Caffe refuses)
is safe in place: a backward that needs the input reads a copy kept by an in-place forward, or
works from the top data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engine import caffe_pb2
from engine.blob import Blob
from engine.layer import NeuronLayer, register_layer


class _KeepsInput(NeuronLayer):
    """A neuron layer whose backward reads x: an in-place forward keeps a copy of x."""

    backward_needs_bottom_data = True
    backward_needs_top_data = False
    keeps_bottom_in_place = True

    _saved: np.ndarray | None = None

    def _keep_input(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._saved = bottom[0].data.copy() if top[0] is bottom[0] else None

    def _input(self, bottom: list[Blob]) -> np.ndarray:
        return self._saved if self._saved is not None else bottom[0].data


@register_layer
class PReLU(_KeepsInput):
    """y = max(x, 0) + a_c * min(x, 0), with a learned slope a per channel (axis 1).

    Shapes: bottom (N, C, ...) with at least 2 axes, top like bottom; the slope blob is (C,), or
    a 0-axis scalar when ``channel_shared``. ``prelu_param.filler`` defaults to constant 0.25. As
    in Caffe the gradient at x == 0 takes the slope side: dy/dx = a, dy/da = x (= 0 there).
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.prelu_param
        if bottom[0].num_axes < 2:
            raise self.error(f"the bottom needs at least 2 axes (N, C, ...); got shape "
                             f"{bottom[0].shape}")
        self.channel_shared = bool(p.channel_shared)
        filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(
            type="constant", value=0.25)
        shape = () if self.channel_shared else (bottom[0].shape[1],)
        self.init_param_blobs([(shape, filler)])

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        channels = bottom[0].shape[1] if bottom[0].num_axes >= 2 else 0
        if not self.channel_shared and channels != self.blobs[0].count:
            raise self.error(f"the bottom has {channels} channels (shape {bottom[0].shape}) but "
                             f"the slope blob has {self.blobs[0].count}")
        super().reshape(bottom, top)

    def _slope(self, x: np.ndarray) -> np.ndarray:
        a = self.blobs[0].data.astype(x.dtype, copy=False)
        return a if self.channel_shared else a.reshape((-1,) + (1,) * (x.ndim - 2))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._keep_input(bottom, top)
        x = self._input(bottom)
        top[0].data[...] = np.where(x > 0, x, x * self._slope(x))

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        x, dy = self._input(bottom), top[0].diff
        negative = x <= 0
        if self.param_down(0):  # before the bottom diff: in place it overwrites dy
            contrib = dy * np.where(negative, x, 0)
            if self.channel_shared:
                self.blobs[0].diff += contrib.sum()
            else:
                per_channel = contrib.reshape(x.shape[0], x.shape[1], -1).sum(axis=2)
                self.blobs[0].diff += per_channel.sum(axis=0)
        if propagate_down[0]:
            one = x.dtype.type(1)
            np.multiply(dy, np.where(negative, self._slope(x), one), out=bottom[0].diff)


@register_layer
class ELU(_KeepsInput):
    """y = x for x > 0, alpha * (exp(x) - 1) otherwise; dy/dx = 1, or y + alpha for x <= 0.

    Caffe's form ``max(x, 0) + alpha * (exp(min(x, 0)) - 1)``. Shape: any, top like bottom.
    """

    backward_needs_top_data = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.alpha = float(self.param.elu_param.alpha)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._keep_input(bottom, top)
        x = self._input(bottom)
        negative_part = np.exp(np.minimum(x, 0))
        negative_part -= 1
        negative_part *= self.alpha
        top[0].data[...] = np.maximum(x, 0) + negative_part

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        x, y = self._input(bottom), top[0].data
        local = np.where(x > 0, x.dtype.type(1), y + self.alpha)
        np.multiply(top[0].diff, local, out=bottom[0].diff)


@register_layer
class AbsVal(NeuronLayer):
    """y = |x|; dy/dx = sign(x) (0 at 0). Shape: any, top like bottom; not in place (Caffe)."""

    backward_needs_bottom_data = True
    backward_needs_top_data = False

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation (backward needs the sign of "
                             "the input)")
        super().reshape(bottom, top)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        np.abs(bottom[0].data, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            np.multiply(top[0].diff, np.sign(bottom[0].data), out=bottom[0].diff)


@register_layer
class BNLL(NeuronLayer):
    """y = log(1 + exp(x)), computed as max(x, 0) + log1p(exp(-|x|)) so it never overflows.

    dy/dx = sigmoid(x) = 1 - exp(-y), read from the top data (safe in place). Shape: any.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = True

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        soft = np.exp(-np.abs(x))
        np.log1p(soft, out=soft)
        np.add(np.maximum(x, 0), soft, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        sigmoid = np.expm1(-top[0].data)  # exp(-y) - 1 = -sigmoid(x), accurate for tiny y
        np.negative(sigmoid, out=sigmoid)
        np.multiply(top[0].diff, sigmoid, out=bottom[0].diff)


@register_layer
class Power(_KeepsInput):
    """y = (shift + scale * x) ^ power; dy/dx = power * scale * (shift + scale * x)^(power - 1).

    As Caffe: when power * scale == 0 the output is the constant shift^power (1 for power 0)
    and the gradient is 0. Shape: any, top like bottom.
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)
        self.diff_scale = self.power * self.scale

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        y = top[0].data
        if self.diff_scale == 0:
            y[...] = 1.0 if self.power == 0 else self.shift ** self.power
            return
        self._keep_input(bottom, top)
        np.multiply(self._input(bottom), self.scale, out=y)
        y += self.shift
        if self.power != 1:
            np.power(y, self.power, out=y)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.diff_scale == 0:
            dx[...] = 0
        elif self.power == 1:
            np.multiply(dy, self.diff_scale, out=dx)
        else:
            base = self._input(bottom) * self.scale
            base += self.shift
            local = base if self.power == 2 else np.power(base, self.power - 1)
            local *= self.diff_scale
            np.multiply(dy, local, out=dx)


def _log_base(layer: NeuronLayer, base: float) -> float:
    """ln(base), with Caffe's base -1 meaning e; any other base must be positive."""
    if base == -1:
        return 1.0
    if base <= 0:
        raise layer.error(f"base must be strictly positive, or -1 for e; got {base}")
    return math.log(base)


@register_layer
class Exp(NeuronLayer):
    """y = base ^ (shift + scale * x) (base -1 means e); dy/dx = ln(base) * scale * y.

    Computed as Caffe does: base^shift * exp(ln(base) * scale * x). Safe in place. Shape: any.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.exp_param
        log_base = _log_base(self, float(p.base))
        self.inner_scale = log_base * float(p.scale)
        self.outer_scale = 1.0 if p.shift == 0 else math.exp(log_base * float(p.shift))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        y = top[0].data
        np.multiply(bottom[0].data, self.inner_scale, out=y)
        np.exp(y, out=y)
        if self.outer_scale != 1:
            y *= self.outer_scale

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            local = top[0].data * self.inner_scale
            np.multiply(top[0].diff, local, out=bottom[0].diff)


@register_layer
class Log(_KeepsInput):
    """y = log_base(shift + scale * x) (base -1 means e); dy/dx = scale / (ln(base) * (shift +
    scale * x)). Shape: any, top like bottom.
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.log_param
        self.base_scale = 1.0 / _log_base(self, float(p.base))
        self.scale, self.shift = float(p.scale), float(p.shift)

    def _shifted(self, x: np.ndarray) -> np.ndarray:
        inner = x * self.scale
        inner += self.shift
        return inner

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._keep_input(bottom, top)
        y = top[0].data
        np.log(self._shifted(self._input(bottom)), out=y)
        if self.base_scale != 1:
            y *= self.base_scale

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            local = self._shifted(self._input(bottom))
            np.divide(self.scale * self.base_scale, local, out=local)
            np.multiply(top[0].diff, local, out=bottom[0].diff)


@register_layer
class Threshold(NeuronLayer):
    """y = 1 if x > threshold else 0. The gradient is zero almost everywhere; backward writes
    zeros (Caffe leaves it NOT_IMPLEMENTED). Shape: any, top like bottom.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.threshold = float(self.param.threshold_param.threshold)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        np.greater(bottom[0].data, self.threshold, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = 0


@register_layer
class Clip(NeuronLayer):
    """y = max(min, min(x, max)); dy/dx = 1 where min <= x <= max (both ends included, as
    Caffe), else 0. Both ``clip_param.min`` and ``max`` are required. Shape: any.
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False
    keeps_bottom_in_place = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.clip_param
        missing = [f for f in ("min", "max") if not p.HasField(f)]
        if missing:
            raise self.error(f"clip_param needs both min and max; missing {', '.join(missing)}")
        self.min, self.max = float(p.min), float(p.max)
        self._inside: np.ndarray | None = None

    def _inside_of(self, x: np.ndarray) -> np.ndarray:
        return (x >= self.min) & (x <= self.max)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        # in place the top no longer tells which inputs were clipped
        self._inside = self._inside_of(x) if top[0] is bottom[0] else None
        np.maximum(np.minimum(x, self.max), self.min, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            inside = self._inside if self._inside is not None else self._inside_of(
                bottom[0].data)
            np.multiply(top[0].diff, inside, out=bottom[0].diff)


@register_layer
class Swish(NeuronLayer):
    """y = x * sigmoid(beta * x); dy/dx = beta * y + sigmoid(beta * x) * (1 - beta * y).

    The sigmoid is Caffe's 0.5 * tanh(0.5 z) + 0.5 and is kept for backward, which with the top
    data makes the layer safe in place. Shape: any, top like bottom.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.beta = float(self.param.swish_param.beta)
        self._sigmoid: np.ndarray | None = None

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        s = x * (0.5 * self.beta)
        np.tanh(s, out=s)
        s *= 0.5
        s += 0.5
        self._sigmoid = s
        np.multiply(x, s, out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self._sigmoid is None or self._sigmoid.shape != top[0].shape:
            raise self.error("backward called before a forward on this shape")
        beta_y = top[0].data * self.beta
        local = 1 - beta_y
        local *= self._sigmoid
        local += beta_y
        np.multiply(top[0].diff, local, out=bottom[0].diff)
