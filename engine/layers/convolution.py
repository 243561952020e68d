"""Convolution: prototxt type ``Convolution``, configured by ``convolution_param``
(ConvolutionParameter; kernels, strides and pads per spatial axis, ``dilation``, ``group``,
``bias_term``, ``weight_filler``, ``bias_filler``, ``axis``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.kernels import (
    add_at_offset,
    conv_out_size,
    im2col_nhwc,
    kernel_offsets,
    nhwc_buffer,
    pad_to_nhwc,
)
from engine.layer import Layer, register_layer

# With fewer input channels per group than this, buffers are stored channel-outermost: the copies
# then move whole image rows rather than a few channel values at a time (measured crossover).
CHANNELS_LAST_MIN = 8
# The input gradient is one GEMM into a full column gradient when that is at most this big, and
# one GEMM per kernel offset otherwise (never materialising a large column gradient).
FULL_DCOL_MAX_BYTES = 4 << 20


class _Columns:
    """The padded input and im2col buffers of one bottom, reused while its shape holds."""

    def __init__(self, n: int, padded: Sequence[int], out_size: Sequence[int],
                 kernel: Sequence[int], channels: int, group: int, dtype: np.dtype,
                 channels_last: bool) -> None:
        cg = channels // group
        self.channels_last = channels_last
        self.shape_key = (n, tuple(padded), tuple(out_size), dtype)
        self.xp = nhwc_buffer(n, padded, channels, dtype, self.channels_last)
        m, kg = n * int(np.prod(out_size)), int(np.prod(kernel)) * cg
        if self.channels_last:
            store = np.empty((group, n, *out_size, *kernel, cg), dtype)
            self.windows = store  # (G, N, *out, *k, Cg)
            self.matrix = store.reshape(group, m, kg)
        else:
            store = np.empty((group, *kernel, cg, n, *out_size), dtype)
            nk, no = len(kernel) + 1, len(out_size)
            order = (0, *range(nk + 1, nk + 1 + no + 1), *range(1, nk + 1))
            self.windows = store.transpose(order)
            self.matrix = store.reshape(group, kg, m).transpose(0, 2, 1)
        self.source: np.ndarray | None = None  # the bottom array the columns were built from


@register_layer
class Convolution(Layer):
    """``top = W * bottom + b``: cross-correlation over the spatial axes after ``axis``.

    Shapes: bottom (N, C, *in) -> top (N, num_output, *out) with, per spatial axis,
    ``out = (in + 2*pad - (dilation*(kernel-1)+1)) // stride + 1`` (Caffe's floor).
    Weight (num_output, C/group, *kernel), bias (num_output,). Groups split the input and output
    channels into contiguous blocks. Several bottoms are allowed; each gives the same-index top
    with the same weights. Any number of spatial axes (1-d, 2-d, 3-d...).

    Forward is im2col from one padded channel-innermost copy + one GEMM per group over the whole
    batch. The columns are kept and reused by backward when the bottom array is the same object
    (the Net never rewrites a bottom between a layer's forward and its backward).
    """

    n_bottom = (1, None)
    n_top = (1, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.convolution_param
        self.axis = self._channel_axis(bottom[0], p.axis)
        n_spatial = bottom[0].num_axes - self.axis - 1
        self.kernel = self._per_axis(p.kernel_size, "kernel_size", "kernel_h", "kernel_w",
                                     n_spatial, default=None)
        self.stride = self._per_axis(p.stride, "stride", "stride_h", "stride_w", n_spatial, 1)
        self.pad = self._per_axis(p.pad, "pad", "pad_h", "pad_w", n_spatial, 0)
        self.dilation = self._per_axis(p.dilation, "dilation", None, None, n_spatial, 1)
        for name, values, low in (("kernel_size", self.kernel, 1), ("stride", self.stride, 1),
                                  ("dilation", self.dilation, 1)):
            if min(values) < low:
                raise self.error(f"{name} must be positive on every axis; got {values}")
        self.num_output, self.group, self.bias_term = p.num_output, p.group, p.bias_term
        self.channels = bottom[0].shape[self.axis]
        self._check_groups()
        cg = self.channels // self.group
        self.channels_last = cg >= CHANNELS_LAST_MIN
        specs = [((self.num_output, cg, *self.kernel), p.weight_filler)]
        if self.bias_term:
            specs.append(((self.num_output,), p.bias_filler))
        self.init_param_blobs(specs)
        self.param_propagate_down = [True] * len(self.blobs)
        self._columns: dict[int, _Columns] = {}
        self._scratch: dict[str, np.ndarray] = {}

    def _channel_axis(self, blob: Blob, axis: int) -> int:
        if not -blob.num_axes <= axis < blob.num_axes:
            raise self.error(f"axis {axis} is out of range for a bottom of shape {blob.shape}")
        axis %= blob.num_axes
        if axis == blob.num_axes - 1:
            raise self.error(f"needs at least one spatial axis after the channel axis {axis}; "
                             f"the bottom has shape {blob.shape}")
        return axis

    def _per_axis(self, values: Sequence[int], name: str, h_name: str | None,
                  w_name: str | None, n_spatial: int, default: int | None) -> tuple[int, ...]:
        """One value per spatial axis from ``name`` (once or per axis) or ``h_name``/``w_name``."""
        p = self.param.convolution_param
        if h_name and (p.HasField(h_name) or p.HasField(w_name)):
            if n_spatial != 2:
                raise self.error(f"{h_name}/{w_name} are for 2-d convolution only; this bottom "
                                 f"has {n_spatial} spatial axes (use repeated {name})")
            if len(values):
                raise self.error(f"give either {name} or {h_name}/{w_name}, not both")
            if default is None and not (p.HasField(h_name) and p.HasField(w_name)):
                raise self.error(f"{h_name} and {w_name} must be given together")
            return int(getattr(p, h_name)), int(getattr(p, w_name))
        if not len(values):
            if default is None:
                raise self.error(f"{name} (or {h_name}/{w_name}) is required")
            return (default,) * n_spatial
        if len(values) not in (1, n_spatial):
            raise self.error(f"{name} must be given once or once per spatial axis "
                             f"({n_spatial}); got {len(values)} values")
        return tuple(int(v) for v in values) * (n_spatial // len(values))

    def _check_groups(self) -> None:
        if self.num_output < 1:
            raise self.error(f"num_output must be positive; got {self.num_output}")
        if self.group < 1:
            raise self.error(f"group must be positive; got {self.group}")
        if self.channels % self.group:
            raise self.error(f"the {self.channels} input channels do not split into "
                             f"group {self.group}")
        if self.num_output % self.group:
            raise self.error(f"num_output {self.num_output} is not a multiple of "
                             f"group {self.group}")

    # -- shapes ----------------------------------------------------------------------------------
    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if len(bottom) != len(top):
            raise self.error(f"needs one top per bottom; got {len(bottom)} bottoms and "
                             f"{len(top)} tops")
        shape = bottom[0].shape
        for i, blob in enumerate(bottom):
            if blob.shape != shape:
                raise self.error(f"all bottoms must have one shape; bottom 0 is {shape}, "
                                 f"bottom {i} is {blob.shape}")
        if len(shape) != self.axis + 1 + len(self.kernel):
            raise self.error(f"the bottom must keep {self.axis + 1 + len(self.kernel)} axes; "
                             f"got shape {shape}")
        if shape[self.axis] != self.channels:
            raise self.error(f"expects {self.channels} channels on axis {self.axis}; the bottom "
                             f"has shape {shape}")
        self.out_size = tuple(self._out_size(n, i) for i, n in enumerate(shape[self.axis + 1:]))
        for blob in top:
            blob.reshape((*shape[:self.axis], self.num_output, *self.out_size))
        self.num = int(np.prod(shape[:self.axis], dtype=np.int64))

    def _out_size(self, size: int, i: int) -> int:
        extent = self.dilation[i] * (self.kernel[i] - 1) + 1
        if extent > size + 2 * self.pad[i]:
            raise self.error(f"the kernel (extent {extent} on spatial axis {i}) is larger than "
                             f"the padded input ({size} + 2*{self.pad[i]})")
        return conv_out_size(size, self.kernel[i], self.pad[i], self.stride[i], self.dilation[i])

    def _columns_for(self, i: int, blob: Blob) -> _Columns:
        padded = tuple(n + 2 * p for n, p in zip(blob.shape[self.axis + 1:], self.pad,
                                                   strict=True))
        key = (self.num, padded, self.out_size, blob.dtype)
        cols = self._columns.get(i)
        if cols is None or cols.shape_key != key:
            cols = _Columns(self.num, padded, self.out_size, self.kernel, self.channels,
                            self.group, blob.dtype, self.channels_last)
            self._columns[i] = cols
        return cols

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._scratch[name] = np.empty(shape, dtype)
        return buf

    # -- forward / backward ----------------------------------------------------------------------
    def _weight_matrix(self) -> np.ndarray:
        """The weights as (group, num_output/group, prod(kernel) * C/group), channel last."""
        w = np.moveaxis(self.blobs[0].data, 1, -1)
        return w.reshape(self.group, self.num_output // self.group, -1)

    def _im2col(self, i: int, blob: Blob) -> _Columns:
        cols = self._columns_for(i, blob)
        x = blob.data.reshape(self.num, self.channels, *blob.shape[self.axis + 1:])
        pad_to_nhwc(x, self.pad, cols.xp)
        cg = self.channels // self.group
        for g in range(self.group):
            im2col_nhwc(cols.xp[..., g * cg:(g + 1) * cg], self.kernel, self.stride,
                        self.dilation, self.out_size, out=cols.windows[g])
        cols.source = blob.data
        return cols

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        w = self._weight_matrix()
        og = self.num_output // self.group
        for i, blob in enumerate(bottom):
            cols = self._im2col(i, blob)
            m = cols.matrix.shape[1]
            y = self._buffer("y", (self.num_output, m), blob.dtype)  # (O, N*P)
            for g in range(self.group):
                np.matmul(w[g], cols.matrix[g].T, out=y[g * og:(g + 1) * og])
            y = y.reshape(self.num_output, self.num, -1).transpose(1, 0, 2)
            out = top[i].data.reshape(y.shape)
            if self.bias_term:
                np.add(y, self.blobs[1].data[:, None], out=out)
            else:
                np.copyto(out, y)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        want = list(self.param_propagate_down) + [True] * len(self.blobs)
        for i, blob in enumerate(bottom):
            dy = self._buffer("dy", (self.num_output, self.num, int(np.prod(self.out_size))),
                              blob.dtype)
            np.copyto(dy, top[i].diff.reshape(self.num, self.num_output, -1).transpose(1, 0, 2))
            dy = dy.reshape(self.num_output, -1)  # (O, N*P)
            if self.bias_term and want[1]:
                self.blobs[1].diff += dy.sum(axis=1)
            if want[0]:
                self._weight_gradient(i, blob, dy)
            if propagate_down[i]:
                self._bottom_gradient(blob, dy)

    def _weight_gradient(self, i: int, blob: Blob, dy: np.ndarray) -> None:
        cols = self._columns.get(i)
        if cols is None or cols.source is not blob.data:
            cols = self._im2col(i, blob)
        og = self.num_output // self.group
        dw = np.empty_like(self._weight_matrix())
        for g in range(self.group):
            np.matmul(dy[g * og:(g + 1) * og], cols.matrix[g], out=dw[g])
        dw = dw.reshape(self.num_output, *self.kernel, -1)
        self.blobs[0].diff += np.moveaxis(dw, -1, 1)

    def _bottom_gradient(self, blob: Blob, dy: np.ndarray) -> None:
        """Input gradient: column gradients added into a padded buffer, offset by offset."""
        spatial = blob.shape[self.axis + 1:]
        padded = tuple(n + 2 * p for n, p in zip(spatial, self.pad, strict=True))
        dxp = self._scratch.get("dxp")
        if dxp is None or dxp.shape != (self.num, *padded, self.channels) or \
                dxp.dtype != blob.dtype:
            dxp = nhwc_buffer(self.num, padded, self.channels, blob.dtype, self.channels_last)
            self._scratch["dxp"] = dxp
        else:
            dxp.fill(0)
        w = self._weight_matrix()
        og, cg = self.num_output // self.group, self.channels // self.group
        n_out = (self.num, *self.out_size)
        for g in range(self.group):
            dy_g, w_g, dx_g = dy[g * og:(g + 1) * og], w[g], dxp[..., g * cg:(g + 1) * cg]
            for k, offset in enumerate(kernel_offsets(self.kernel)):
                w_k = w_g[:, k * cg:(k + 1) * cg]  # (O/G, C/G)
                if self.channels_last:
                    values = (dy_g.T @ w_k).reshape(*n_out, cg)
                else:
                    values = np.moveaxis((w_k.T @ dy_g).reshape(cg, *n_out), 0, -1)
                add_at_offset(dx_g, values, offset, self.stride, self.dilation)
        interior = tuple(slice(p, p + n) for p, n in zip(self.pad, spatial, strict=True))
        dx = np.moveaxis(dxp[(slice(None), *interior, slice(None))], -1, 1)
        np.copyto(blob.diff.reshape(dx.shape), dx)
