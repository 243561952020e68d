"""Normalization layers: ``LRN`` (lrn_param), ``BatchNorm`` (batch_norm_param) and ``MVN``
(mvn_param)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.kernels import Workspace
from engine.layer import TEST, Layer, register_layer
from engine.parallel import for_batch_blocks

ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1  # LRNParameter.NormRegion
# LRN runs its elementwise chain over blocks of the batch of about this many elements, so the
# block's temporaries stay in cache between the passes.
LRN_BLOCK_WORK = 1 << 18


def _centred_sum(a: np.ndarray, axis: int, size: int, out: np.ndarray) -> np.ndarray:
    """Sum of ``a`` over a window of ``size`` (odd) centred on each index along ``axis``, with
    zeros past the ends, written into ``out`` (which may be ``a``: then a copy is summed).
    Symmetric, so it is also its own adjoint (the backward's window sum).
    """
    if out is a:
        a = a.copy()
    np.copyto(out, a)
    head = [slice(None)] * a.ndim
    tail = [slice(None)] * a.ndim
    for shift in range(1, min((size - 1) // 2, a.shape[axis] - 1) + 1):
        head[axis], tail[axis] = slice(shift, None), slice(None, -shift)
        out[tuple(head)] += a[tuple(tail)]
        out[tuple(tail)] += a[tuple(head)]
    return out


@register_layer
class LRN(Layer):
    """Local response normalization, y = x * scale^-beta, with n = ``local_size`` (odd).

    ACROSS_CHANNELS: ``scale = k + alpha/n * sum of x^2 over the n channels centred on c``,
    zero padded over channels. WITHIN_CHANNEL: ``scale = 1 + alpha * S / n^2`` with S the sum of
    x^2 over the n x n window centred on (h, w), zero padded; Caffe builds it from AVE pooling
    with pad (n-1)/2 and stride 1, whose divisor is n^2 at every position (padding counts), and
    ignores k. Backward is Caffe's closed form: ``dx = dy * scale^-beta - 2 alpha beta / n'
    * x * window_sum(dy * y / scale)`` with n' = n (across) or n^2 (within).

    Forward and backward run their elementwise chains block by block over the batch, on the
    threads, each block's temporaries in cache (AlexNet's norm1, 10x96x55x55, forward/backward
    on two threads: 12.3 / 14.7 ms whole-array passes, 6.1-7.6 / 6.5 ms by blocks when the other
    core is free; one thread 11.9 / 13.6 vs 12.0 / 12.0 ms). Backward computes ``scale^-beta``
    again rather than keeping it, as Caffe does (a top-sized array less: 19 MB in AlexNet).

    Shapes: bottom (N, C, H, W), top like bottom; not in place (backward needs x).
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 != 1:
            raise self.error(f"lrn_param.local_size must be odd; got {self.size}")
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.region = p.norm_region
        if self.region not in (ACROSS_CHANNELS, WITHIN_CHANNEL):
            raise self.error(f"unknown lrn_param.norm_region {self.region}")
        window = self.size if self.region == ACROSS_CHANNELS else self.size**2
        self.grad_coeff = 2 * self.alpha * self.beta / window
        self._scale: np.ndarray | None = None  # kept for backward (scale^-beta is not)
        self._work = Workspace()  # per-thread block scratch

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if bottom[0].num_axes != 4:
            raise self.error(f"the bottom must have 4 axes (N, C, H, W); got shape "
                             f"{bottom[0].shape}")
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation (backward needs the input)")
        top[0].reshape(bottom[0].shape)

    _keep_state = True  # keep the scale for backward (not in a net without backward)

    def share_workspace(self, shared, keep_for_backward: bool) -> None:
        """The Net's memory hook (engine/memory.py): without backward, keep no state."""
        self._keep_state = keep_for_backward

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        if not self._keep_state:
            self._scale = None
        elif self._scale is None or self._scale.shape != x.shape or self._scale.dtype != x.dtype:
            self._scale = np.empty_like(x)

        def block(worker: int, a: int, b: int) -> None:
            work = self._work.lane(worker)
            shape = (b - a, *x.shape[1:])
            squares = work.get("squares", shape, x.dtype)
            scale = self._scale[a:b] if self._keep_state else work.get("scale", shape, x.dtype)
            np.square(x[a:b], out=squares)
            self._window_sum_into(squares, scale)
            if self.region == ACROSS_CHANNELS:
                scale *= self.alpha / self.size
                scale += self.k
            else:
                scale /= self.size**2  # the AVE pooling's divisor, then Power(shift 1, scale alpha)
                scale *= self.alpha
                scale += 1
            factor = np.power(scale, -self.beta, out=squares)
            np.multiply(x[a:b], factor, out=y[a:b])
        for_batch_blocks(block, x.shape[0], x[0].size, LRN_BLOCK_WORK)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self._scale is None or self._scale.shape != top[0].shape:
            raise self.error("backward called before a forward on this shape")
        dy, y, x, dx = top[0].diff, top[0].data, bottom[0].data, bottom[0].diff

        def block(worker: int, a: int, b: int) -> None:
            work = self._work.lane(worker)
            shape = (b - a, *x.shape[1:])
            ratio = work.get("squares", shape, x.dtype)
            window = work.get("scale", shape, x.dtype)
            scale = self._scale[a:b]
            np.multiply(dy[a:b], y[a:b], out=ratio)
            ratio /= scale
            self._window_sum_into(ratio, window)
            window *= x[a:b]
            window *= self.grad_coeff
            factor = np.power(scale, -self.beta, out=ratio)  # again, as Caffe: not kept
            np.multiply(dy[a:b], factor, out=dx[a:b])
            dx[a:b] -= window
        for_batch_blocks(block, x.shape[0], x[0].size, LRN_BLOCK_WORK)

    def _window_sum_into(self, a: np.ndarray, out: np.ndarray) -> None:
        if self.region == ACROSS_CHANNELS:
            _centred_sum(a, 1, self.size, out)
        else:
            _centred_sum(_centred_sum(a, 2, self.size, out), 3, self.size, out)


@register_layer
class BatchNorm(Layer):
    """y = (x - mean) / sqrt(var + eps) per channel (axis 1); no affine part (add a Scale).

    Blobs (all lr_mult 0; Caffe's fatal error for any other): [0] mean accumulator (C,),
    [1] variance accumulator (C,), [2] their normalizer s (1,). Training (``use_global_stats``
    false; by default it is ``phase == TEST``, fixed at setup): mean and biased var over the
    batch and spatial axes, then, exactly as Caffe, ``s = maf*s + 1``, ``M = maf*M + mean``,
    ``V = maf*V + m/(m-1) * var`` (m = count / C; maf = moving_average_fraction). Global stats:
    mean = M/s, var = V/s (0 when s == 0). Backward (training): ``dx = (dy - mean(dy) -
    y * mean(dy * y)) / std``; global: ``dx = dy / std``.

    Shapes: bottom (N, C, ...) or (N,) (one channel), top like bottom; safe in place.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.batch_norm_param
        # float32 as in Caffe (pure-Python protobuf runtimes return float defaults unrounded)
        self.maf, self.eps = float(np.float32(p.moving_average_fraction)), float(np.float32(p.eps))
        self.use_global_stats = (bool(p.use_global_stats) if p.HasField("use_global_stats")
                                 else self.phase == TEST)
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        c = self.channels
        self.init_param_blobs([((c,), None), ((c,), None), ((1,), None)])
        self._fix_param_specs()
        self._x_norm: np.ndarray | None = None
        self._std: np.ndarray | None = None

    def _fix_param_specs(self) -> None:
        """The statistics are not learned: any missing ``param`` gets lr_mult 0 (the Net reads
        the specs after setup), and a given non-zero lr_mult is an error, as in Caffe."""
        specs = self.param.param
        for j in range(len(self.blobs)):
            if j == len(specs):
                spec = specs.add()
                spec.lr_mult = 0
                spec.decay_mult = 0
            elif specs[j].lr_mult != 0:
                raise self.error(
                    f"param {j} has lr_mult {specs[j].lr_mult}, but batch normalization "
                    "statistics cannot be configured as learned parameters; use lr_mult: 0 "
                    "(or give no param) and put a Scale layer after it for the affine part"
                )

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        if bottom[0].num_axes == 0 or channels != self.channels:
            raise self.error(f"set up for {self.channels} channels (axis 1); the bottom has "
                             f"shape {bottom[0].shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def _view(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], self.channels, -1)  # (N, C, spatial)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = self._view(bottom[0].data)
        if self.use_global_stats:
            s = self.blobs[2].data[0]
            factor = 0 if s == 0 else 1 / s
            mean = (self.blobs[0].data * factor).astype(x.dtype, copy=False)
            var = (self.blobs[1].data * factor).astype(x.dtype, copy=False)
            centred = x - mean[:, None]
        else:
            mean = x.mean(axis=(0, 2))
            centred = x - mean[:, None]
            var = np.square(centred).mean(axis=(0, 2))
            self._accumulate(mean, var, x.size // self.channels)
        std = np.sqrt(var + self.eps)[:, None]
        centred /= std
        self._x_norm, self._std = centred, std
        self._view(top[0].data)[...] = centred

    def _accumulate(self, mean: np.ndarray, var: np.ndarray, m: int) -> None:
        mean_acc, var_acc, norm = (b.data for b in self.blobs)
        dtype = var.dtype.type
        correction = dtype(m) / dtype(m - 1) if m > 1 else dtype(1)
        norm *= self.maf
        norm += 1
        mean_acc *= self.maf
        mean_acc += mean
        var_acc *= self.maf
        var_acc += correction * var

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self._std is None or self._x_norm is None or self._x_norm.size != top[0].count:
            raise self.error("backward called before a forward on this shape")
        dy, dx = self._view(top[0].diff), self._view(bottom[0].diff)
        if self.use_global_stats:
            np.divide(dy, self._std, out=dx)
            return
        y = self._x_norm
        grad = dy - dy.mean(axis=(0, 2))[:, None]
        grad -= y * (dy * y).mean(axis=(0, 2))[:, None]
        grad /= self._std
        dx[...] = grad  # in place dx is dy: written only once grad is complete


@register_layer
class MVN(Layer):
    """Mean-variance normalization: y = (x - mean) / (std + eps), or y = x - mean when
    ``normalize_variance`` is false. Statistics per (n, c) plane, or per item n when
    ``across_channels``. eps is added *after* the square root, as in Caffe.

    Backward is Caffe's formula ``dx = (dy - mean(dy) - y * mean(dy * y)) / (std + eps)``
    (``dx = dy - mean(dy)`` without variance normalization). Shapes: any with N (and C), top
    like bottom; safe in place.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)
        self._y: np.ndarray | None = None
        self._std: np.ndarray | None = None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        b = bottom[0]
        self.groups = b.num if self.across_channels else b.num * b.channels
        if top[0] is not bottom[0]:
            top[0].reshape(b.shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data.reshape(self.groups, -1)
        y = x - x.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            std = np.sqrt(np.square(y).mean(axis=1, keepdims=True))
            std += self.eps
            y /= std
            self._std = std
        self._y = y  # kept: a later in-place layer may overwrite the top
        top[0].data.reshape(self.groups, -1)[...] = y

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self._y is None or self._y.size != top[0].count:
            raise self.error("backward called before a forward on this shape")
        dy = top[0].diff.reshape(self.groups, -1)
        grad = dy - dy.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            y = self._y
            grad -= y * (dy * y).mean(axis=1, keepdims=True)
            grad /= self._std
        bottom[0].diff.reshape(self.groups, -1)[...] = grad
