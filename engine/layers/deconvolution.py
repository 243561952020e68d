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
        super().setup(bottom, top)
        self._work = Workspace()

    def weight_shape(self) -> tuple[int, ...]:
        return (self.channels, self.num_output // self.geom.group, *self.geom.kernel)

    def output_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``stride*(in-1) + dilation*(kernel-1)+1 - 2*pad`` per spatial axis."""
        g = self.geom
        out = tuple(s * (n - 1) + d * (k - 1) + 1 - 2 * p
                    for n, k, s, p, d in zip(shape[self.axis + 1:], g.kernel, g.stride, g.pad,
                                             g.dilation, strict=True))
        if min(out) < 1:
            raise self.error(f"the padding {g.pad} leaves no output for bottom {shape} "
                             f"(output size {out})")
        return out

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
        kernel, stride, pad, dilation = self.read_geometry(bottom[0])
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
