"""Transposed convolution and im2col: prototxt types ``Deconvolution`` and ``Im2col``, both
configured by ``convolution_param`` (ConvolutionParameter; Im2col ignores ``num_output``,
``group``, ``bias_term`` and the fillers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.kernels import (
    ConvGeometry,
    Workspace,
    conv_backward_data,
    conv_backward_params,
    conv_columns,
    conv_forward,
    kernel_offsets,
    offset_slices,
)
from engine.layer import register_layer
from engine.layers.convolution import Convolution


def _read_geometry(layer: Convolution, bottom: Blob) -> tuple[tuple[int, ...], ...]:
    """Convolution's reading of ``convolution_param``: sets ``layer.axis``; returns kernel,
    stride, pad and dilation per spatial axis, validated."""
    p = layer.param.convolution_param
    layer.axis = layer._channel_axis(bottom, p.axis)
    n_spatial = bottom.num_axes - layer.axis - 1
    kernel = layer._per_axis(p.kernel_size, "kernel_size", "kernel_h", "kernel_w", n_spatial,
                             default=None)
    stride = layer._per_axis(p.stride, "stride", "stride_h", "stride_w", n_spatial, 1)
    pad = layer._per_axis(p.pad, "pad", "pad_h", "pad_w", n_spatial, 0)
    dilation = layer._per_axis(p.dilation, "dilation", None, None, n_spatial, 1)
    for name, values in (("kernel_size", kernel), ("stride", stride), ("dilation", dilation)):
        if min(values) < 1:
            raise layer.error(f"{name} must be positive on every spatial axis; got {values}")
    return kernel, stride, pad, dilation


@register_layer
class Deconvolution(Convolution):
    """``top = W^T * bottom + b``: the transpose of Convolution (its input gradient).

    Shapes: bottom (N, C, *in) -> top (N, num_output, *out) with, per spatial axis,
    ``out = stride*(in-1) + dilation*(kernel-1)+1 - 2*pad``. Weight (C, num_output/group,
    *kernel) as in Caffe (the layout of the Convolution it transposes), bias (num_output,).
    Forward is a convolution's data gradient, backward to the bottom a convolution forward,
    the weight gradient a convolution weight gradient with the roles of top and bottom swapped.
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.convolution_param
        kernel, stride, pad, dilation = _read_geometry(self, bottom[0])
        self.num_output, self.bias_term = p.num_output, p.bias_term
        self.channels = bottom[0].shape[self.axis]
        self._check_groups(p.group)
        self.geom = ConvGeometry(kernel, stride, pad, dilation, p.group)
        specs = [((self.channels, self.num_output // p.group, *kernel), p.weight_filler)]
        if self.bias_term:
            specs.append(((self.num_output,), p.bias_filler))
        self.init_param_blobs(specs)
        self.param_propagate_down = [True] * len(self.blobs)
        self._work = Workspace()

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if len(bottom) != len(top):
            raise self.error(f"needs one top per bottom; got {len(bottom)} bottoms and "
                             f"{len(top)} tops")
        shape = bottom[0].shape
        for i, blob in enumerate(bottom[1:], 1):
            if blob.shape != shape:
                raise self.error(f"all bottoms must have one shape; bottom 0 is {shape}, "
                                 f"bottom {i} is {blob.shape}")
        if len(shape) != self.axis + 1 + len(self.geom.kernel):
            raise self.error(f"the bottom must keep its {self.axis + 1 + len(self.geom.kernel)} "
                             f"axes; got shape {shape}")
        if shape[self.axis] != self.channels:
            raise self.error(f"expects {self.channels} channels on axis {self.axis}; the bottom "
                             f"has shape {shape}")
        g = self.geom
        self.out_size = tuple(
            s * (n - 1) + d * (k - 1) + 1 - 2 * p
            for n, k, s, p, d in zip(shape[self.axis + 1:], g.kernel, g.stride, g.pad,
                                     g.dilation, strict=True))
        if min(self.out_size) < 1:
            raise self.error(f"the padding {g.pad} leaves no output for bottom {shape} "
                             f"(output size {self.out_size})")
        self.num = int(np.prod(shape[:self.axis], dtype=np.int64))
        for blob in top:
            blob.reshape((*shape[:self.axis], self.num_output, *self.out_size))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        for b, t in zip(bottom, top, strict=True):
            y = self._nchw(t.data, self.num_output)
            conv_backward_data(self._nchw(b.data, self.channels), self.blobs[0].data,
                               self.geom, self._work, y)
            if self.bias_term:
                y += self.blobs[1].data.reshape(-1, *(1,) * len(self.out_size))

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        want = [*self.param_propagate_down, True, True]
        weight_diff = self.blobs[0].diff if want[0] else None
        for t, b, down in zip(top, bottom, propagate_down, strict=True):
            dy = self._nchw(t.diff, self.num_output)
            if self.bias_term and want[1]:
                self.blobs[1].diff += dy.sum(axis=(0, *range(2, dy.ndim)))
            if down:  # the columns of dy come with the convolution that gives dx
                matrix = conv_forward(dy, self.blobs[0].data, None, self.geom, self._work,
                                      self._nchw(b.diff, self.channels))
            elif weight_diff is not None:
                matrix = conv_columns(dy, self.geom, self._work)
            if weight_diff is not None:
                conv_backward_params(self._nchw(b.data, self.channels), matrix, self.geom,
                                     self._work, weight_diff, None)


@register_layer
class Im2col(Convolution):
    """The im2col matrix of each image as a blob, in Caffe's column order.

    Shapes: bottom (N, C, *in) -> top (N, C*prod(kernel), *out) with Convolution's ``out``;
    channel ``(c, k_1, ..., k_d)`` of the top (channel-major, then kernel offsets row-major)
    holds, at each output cell, the input cell that kernel offset meets (0 in the padding).
    Backward is col2im: each input cell sums the column entries that read it.
    """

    n_bottom = (1, 1)
    n_top = (1, 1)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        kernel, stride, pad, dilation = _read_geometry(self, bottom[0])
        self.channels = bottom[0].shape[self.axis]
        self.geom = ConvGeometry(kernel, stride, pad, dilation)
        self.num_output = self.channels * int(np.prod(kernel))
        self._padded: np.ndarray | None = None

    def _windows(self, padded: np.ndarray):
        """(kernel offset, the padded cells it meets in every window) pairs."""
        lead = (slice(None), slice(None))
        for offset in kernel_offsets(self.geom.kernel):
            cells = offset_slices(offset, self.geom.stride, self.out_size, self.geom.dilation)
            yield offset, padded[(*lead, *cells)]

    def _columns(self, array: np.ndarray) -> np.ndarray:
        """A top array as (N, C, *kernel, *out)."""
        return array.reshape(self.num, self.channels, *self.geom.kernel, *self.out_size)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = self._nchw(bottom[0].data, self.channels)
        shape = (*x.shape[:2], *self.geom.padded(x.shape[2:]))
        padded = np.zeros(shape, x.dtype)
        interior = tuple(slice(p, p + n) for p, n in zip(self.geom.pad, x.shape[2:], strict=True))
        padded[(slice(None), slice(None), *interior)] = x
        columns = self._columns(top[0].data)
        for offset, cells in self._windows(padded):
            columns[(slice(None), slice(None), *offset)] = cells

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        dx = self._nchw(bottom[0].diff, self.channels)
        padded = np.zeros((*dx.shape[:2], *self.geom.padded(dx.shape[2:])), dx.dtype)
        columns = self._columns(top[0].diff)
        for offset, cells in self._windows(padded):
            cells += columns[(slice(None), slice(None), *offset)]
        interior = tuple(slice(p, p + n) for p, n in zip(self.geom.pad, dx.shape[2:],
                                                         strict=True))
        dx[...] = padded[(slice(None), slice(None), *interior)]
