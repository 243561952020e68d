"""The forks' ``BN`` layer (bn_param): batch normalization with its own scale and shift.

Two forks register ``BN`` with different messages and blobs; the form is read from the
parameters given (any PSPNet field, or four stored blobs, means PSPNet's):

- SegNet (alexgkendall/caffe-segnet) and ENet (TimoSaemann/caffe-enet), identical in both:
  blobs [scale, shift], each (1, C, 1, 1). ``bn_mode: LEARN`` normalizes with the batch's
  statistics in every phase; ``INFERENCE`` is ``y = scale * x + shift``: the forks keep no
  moving averages, their ``compute_bn_statistics.py`` folds the dataset statistics into scale
  and shift after training.
- PSPNet (hszhao/PSPNet): blobs [slope, bias, mean, variance], each (1, C, 1, 1); moving
  averages of the batch statistics in TRAIN (``blob = (1 - momentum) * batch + momentum *
  blob``), used in TEST and whenever ``frozen: true``. As the fork, setup forces lr_mult and
  decay_mult 0 on the two statistics (and on slope and bias when frozen).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import TEST, Layer, register_layer

LEARN, INFERENCE = 0, 1  # BNParameter.BNMode
SEGNET_EPS = 1e-9  # the SegNet/ENet layer's fixed variance epsilon
PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")


def _channel_sum(a: np.ndarray) -> np.ndarray:
    """Sum of an (N, C, S) array over N and S, as (C,)."""
    return a.sum(axis=2).sum(axis=0)


@register_layer
class BN(Layer):
    """Batch normalization with its own scale and shift (SegNet/ENet and PSPNet forms).

    LEARN (SegNet/ENet, in every phase): ``mean = E[x]``, ``var = E[x^2] - mean^2`` over
    (N, H, W), ``x_hat = (x - mean) / sqrt(var + 1e-9)``, ``y = scale * x_hat + shift``;
    optional tops 1 and 2 receive the batch mean and variance, (1, C, 1, 1). Backward, with
    ``g = scale * dy``: ``dx = (g - E[g] - x_hat * E[g * x_hat]) / sqrt(var + 1e-9)``,
    ``dscale = sum(dy * x_hat)``, ``dshift = sum(dy)``. INFERENCE: ``y = scale * x + shift``,
    ``dscale = sum(dy * x)``. PSPNet: TRAIN as LEARN with ``var = E[(x - mean)^2]`` and
    ``eps``; TEST or frozen ``y = slope * (x - mean) / sqrt(variance + eps) + bias`` with the
    stored statistics, which backward treats as constants.
    Parameter diffs accumulate (the forks overwrite them), as every Moka layer's do.
    Shapes: bottom (N, C, ...) -> top like bottom; safe in place.
    """

    n_top = (1, 3)
    backward_needs_bottom_data = False  # x_hat (or x) and the statistics are kept
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.bn_param
        self.pspnet = any(p.HasField(f) for f in PSPNET_FIELDS) or len(self._stored_blobs) == 4
        if bottom[0].num_axes < 2:
            raise self.error(f"the bottom needs a channel axis (N, C, ...); got shape "
                             f"{bottom[0].shape}")
        shape = (1, bottom[0].shape[1], 1, 1)
        if self.pspnet:
            self._setup_pspnet(p, shape, top)
            return
        self.mode = p.bn_mode
        if self.mode == INFERENCE and len(top) > 1:
            raise self.error("bn_mode INFERENCE has one top; the mean and variance tops exist "
                             "only in LEARN mode")
        self.init_param_blobs([(shape, p.scale_filler), (shape, p.shift_filler)])
        self.eps = SEGNET_EPS

    def _setup_pspnet(self, p, shape: tuple[int, ...], top: list[Blob]) -> None:
        if len(top) > 1:
            raise self.error("PSPNet's BN form has one top")
        self.frozen = bool(p.frozen)
        self.momentum, self.eps = float(p.momentum), float(p.eps)
        self.mode = INFERENCE if self.frozen or self.phase == TEST else LEARN
        self.init_param_blobs([(shape, p.slope_filler), (shape, p.bias_filler),
                               (shape, None), (shape, None)])
        if not self._stored_blobs and self.frozen:
            self.blobs[3].data[...] = 1  # the fork starts a frozen layer's variance at 1
        specs = self.param.param  # the Net reads the specs after setup
        while len(specs) < 4:
            specs.add()
        for j in (0, 1, 2, 3) if self.frozen else (2, 3):
            specs[j].lr_mult, specs[j].decay_mult = 0, 0

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) < 2 or shape[1] != self.blobs[0].count:
            raise self.error(f"the bottom must have {self.blobs[0].count} channels (axis 1), "
                             f"as when the layer was set up; got shape {shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(shape)
        for blob in top[1:]:
            blob.reshape(self.blobs[0].shape)

    def _planes(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], a.shape[1], -1)

    def _vector(self, i: int) -> np.ndarray:
        return self.blobs[i].data.reshape(1, -1, 1)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = self._planes(bottom[0].data)
        y = self._planes(top[0].data)
        if self.mode == LEARN:
            mean, var = self._batch_statistics(x)
            for blob, value in zip(top[1:], (mean, var), strict=False):
                blob.data[...] = value.reshape(blob.shape)
            self.inv_std = 1 / np.sqrt(var + self.dtype.type(self.eps)).reshape(1, -1, 1)
            self.x_hat = (x - mean.reshape(1, -1, 1)) * self.inv_std
        elif self.pspnet:  # the stored statistics
            self.inv_std = 1 / np.sqrt(self._vector(3) + self.dtype.type(self.eps))
            self.x_hat = (x - self._vector(2)) * self.inv_std
        else:
            self.x_hat = x.copy()  # dscale needs x, which an in-place top overwrites
            self.inv_std = None
        np.copyto(y, self._vector(0) * self.x_hat + self._vector(1))

    def _batch_statistics(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and biased variance, each fork's way; PSPNet also updates its
        moving averages."""
        count = x.shape[0] * x.shape[2]
        mean = _channel_sum(x) / count
        if not self.pspnet:
            return mean, _channel_sum(x * x) / count - mean * mean  # E[x^2] - E[x]^2
        centred = x - mean.reshape(1, -1, 1)
        var = _channel_sum(centred * centred) / count
        m = self.dtype.type(self.momentum)
        for blob, value in ((self.blobs[2], mean), (self.blobs[3], var)):
            blob.data[...] = (1 - m) * value.reshape(blob.shape) + m * blob.data
        return mean, var

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        dy = self._planes(top[0].diff)
        if self.param_down(0):
            self.blobs[0].diff.reshape(-1)[...] += _channel_sum(dy * self.x_hat)
        if self.param_down(1):
            self.blobs[1].diff.reshape(-1)[...] += _channel_sum(dy)
        if not propagate_down[0]:
            return
        g = dy * self._vector(0)
        if self.inv_std is None:  # INFERENCE: y is affine in x
            dx = g
        elif self.mode == INFERENCE:  # PSPNet's stored statistics are constants
            dx = g * self.inv_std
        else:
            count = dy.shape[0] * dy.shape[2]
            mean_g = _channel_sum(g).reshape(1, -1, 1) / count
            mean_gx = _channel_sum(g * self.x_hat).reshape(1, -1, 1) / count
            dx = (g - mean_g - self.x_hat * mean_gx) * self.inv_std
        np.copyto(self._planes(bottom[0].diff), dx)
