"""Convolution: prototxt type ``Convolution``, configured by ``convolution_param``
(ConvolutionParameter: ``num_output``, ``kernel_size``/``kernel_h``/``kernel_w``,
``stride``/``stride_h``/``stride_w``, ``pad``/``pad_h``/``pad_w``, ``dilation``, ``group``,
``bias_term``, ``weight_filler``, ``bias_filler``, ``axis``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.depthwise_kernels import depthwise_backward, depthwise_forward
from engine.kernels import (
    ConvGeometry,
    Workspace,
    column_bytes,
    conv_backward_blocked,
    conv_blocks,
    conv_forward_blocked,
)
from engine.layer import Layer, register_layer


@register_layer
class Convolution(Layer):
    """``top = W * bottom + b``: cross-correlation over the spatial axes after ``axis``.

    Shapes: bottom (N, C, *in) -> top (N, num_output, *out) with, per spatial axis,
    ``out = (in + 2*pad - (dilation*(kernel-1)+1)) // stride + 1`` (Caffe's floor). Weight
    (num_output, C/group, *kernel), bias (num_output,). Groups split the input and output
    channels into contiguous blocks. Any number of spatial axes (1-d, 2-d, 3-d...). Several
    bottoms are allowed, all of one shape; each gives the same-index top with the same weights.

    Forward is im2col + one GEMM per group over blocks of the batch whose columns fit in cache
    (``kernels.conv_forward_blocked``), the blocks spread over the threads; with one filter per
    channel (``group == channels == num_output``: depthwise) a direct kernel instead
    (engine/depthwise_kernels.py). Backward builds each block's columns again rather than
    keeping the batch's, in training too: on two threads, interleaved, CIFAR10-quick's training
    iteration took 94-120 ms at 163 MB peak RSS this way against 100-122 ms at 356-365 MB with the
    whole batch's columns kept for backward. A batch that is one block (LeNet's layers) keeps
    its forward's columns for backward when the net runs backward (``share_workspace``), and
    they are reused when the bottom array is the same object (the Net never rewrites a bottom
    between a layer's forward and its backward; an in-place writer gets a Split copy).
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False

    n_bottom = (1, None)
    n_top = (1, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.convolution_param
        kernel, stride, pad, dilation = self.read_geometry(bottom[0])
        self.num_output, self.bias_term = p.num_output, p.bias_term
        self.channels = bottom[0].shape[self.axis]
        self._check_groups(p.group)
        self.geom = ConvGeometry(kernel, stride, pad, dilation, p.group)
        # one filter per channel (MobileNet's depthwise layers): the direct kernel, no columns
        self.direct = p.group == self.channels == self.num_output
        specs = [(self.weight_shape(), p.weight_filler)]
        if self.bias_term:
            specs.append(((self.num_output,), p.bias_filler))
        self.init_param_blobs(specs)
        self.param_propagate_down = [True] * len(self.blobs)
        self._work: dict[int, Workspace] = {}  # per bottom (depthwise kernel's buffers)
        self._scratch = Workspace()  # im2col buffers shared by all bottoms
        self._kept_scratch = self._scratch  # where a one-block forward's columns stay
        self._kept_for: np.ndarray | None = None  # the bottom array whose columns are kept

    def share_workspace(self, shared, keep_for_backward: bool) -> None:
        """Compute im2col blocks in the net's shared scratch buffers (engine/memory.py); with
        ``keep_for_backward``, the columns of a batch that is one block stay this layer's own
        (backward reuses them). Subclasses with their own forward (Deconvolution, Im2col) keep
        their buffers."""
        if type(self).forward is Convolution.forward:
            self._scratch = shared.view(self)
            self._kept_scratch = (shared.view(self, ("columns",)) if keep_for_backward
                                  else self._scratch)
            self._kept_for = None

    def read_geometry(self, bottom: Blob) -> tuple[tuple[int, ...], ...]:
        """Read ``convolution_param``: sets ``self.axis``; returns kernel, stride, pad and
        dilation per spatial axis, validated."""
        p = self.param.convolution_param
        self.axis = self._channel_axis(bottom, p.axis)
        n_spatial = bottom.num_axes - self.axis - 1
        kernel = self._per_axis(p.kernel_size, "kernel_size", "kernel_h", "kernel_w",
                                n_spatial, default=None)
        stride = self._per_axis(p.stride, "stride", "stride_h", "stride_w", n_spatial, 1)
        pad = self._per_axis(p.pad, "pad", "pad_h", "pad_w", n_spatial, 0)
        dilation = self._per_axis(p.dilation, "dilation", None, None, n_spatial, 1)
        for name, values in (("kernel_size", kernel), ("stride", stride),
                             ("dilation", dilation)):
            if min(values) < 1:
                raise self.error(f"{name} must be positive on every spatial axis; got {values}")
        return kernel, stride, pad, dilation

    def weight_shape(self) -> tuple[int, ...]:
        return (self.num_output, self.channels // self.geom.group, *self.geom.kernel)

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
        """One value per spatial axis, from ``name`` (once or per axis) or ``h_name``/``w_name``."""
        p = self.param.convolution_param
        if h_name and (p.HasField(h_name) or p.HasField(w_name)):
            if n_spatial != 2:
                raise self.error(f"{h_name}/{w_name} are for 2-d convolution only; this bottom "
                                 f"has {n_spatial} spatial axes (repeat {name} instead)")
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

    def _check_groups(self, group: int) -> None:
        if self.num_output < 1:
            raise self.error(f"num_output must be positive; got {self.num_output}")
        if group < 1:
            raise self.error(f"group must be positive; got {group}")
        if self.channels % group:
            raise self.error(f"{self.channels} input channels do not split into group {group}")
        if self.num_output % group:
            raise self.error(f"num_output {self.num_output} is not a multiple of group {group}")

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if len(bottom) != len(top):
            raise self.error(f"needs one top per bottom; got {len(bottom)} bottoms and "
                             f"{len(top)} tops")
        shape = bottom[0].shape
        for i, blob in enumerate(bottom[1:], 1):
            if blob.shape != shape:
                raise self.error(f"all bottoms must have one shape; bottom 0 is {shape}, "
                                 f"bottom {i} is {blob.shape}")
        n_axes = self.axis + 1 + len(self.geom.kernel)
        if len(shape) != n_axes:
            raise self.error(f"the bottom must keep its {n_axes} axes; got shape {shape}")
        if shape[self.axis] != self.channels:
            raise self.error(f"expects {self.channels} channels on axis {self.axis}; the bottom "
                             f"has shape {shape}")
        self.num = int(np.prod(shape[:self.axis], dtype=np.int64))
        self.out_size = self.output_size(shape)
        for blob in top:
            blob.reshape((*shape[:self.axis], self.num_output, *self.out_size))

    def output_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The top's spatial size for a bottom of ``shape`` (Caffe's floor rule)."""
        spatial = shape[self.axis + 1:]
        for i, (size, pad) in enumerate(zip(spatial, self.geom.pad, strict=True)):
            extent = self.geom.dilation[i] * (self.geom.kernel[i] - 1) + 1
            if extent > size + 2 * pad:
                raise self.error(f"the kernel (extent {extent} on spatial axis {i}) is larger "
                                 f"than the padded input ({size} + 2*{pad}); bottom {shape}")
        return self.geom.out_size(spatial)

    def _nchw(self, array: np.ndarray, channels: int) -> np.ndarray:
        """``array`` with the axes before the channel axis merged into one batch axis."""
        return array.reshape(self.num, channels, *array.shape[self.axis + 1:])

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        bias = self.blobs[1].data if self.bias_term else None
        for i, (b, t) in enumerate(zip(bottom, top, strict=True)):
            x, y = self._nchw(b.data, self.channels), self._nchw(t.data, self.num_output)
            if self.direct:
                depthwise_forward(x, self.blobs[0].data, bias, self.geom,
                                  self._work.setdefault(i, Workspace()), y)
                continue
            one = len(conv_blocks(self.num, column_bytes(x, self.geom))) == 1
            conv_forward_blocked(x, self.blobs[0].data, bias, self.geom,
                                 self._kept_scratch if one else self._scratch, y)
            self._kept_for = b.data if one and len(bottom) == 1 else None

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        want = [*self.param_propagate_down, True, True]
        weight_diff = self.blobs[0].diff if want[0] else None
        bias_diff = self.blobs[1].diff if self.bias_term and want[1] else None
        for i, (t, b) in enumerate(zip(top, bottom, strict=True)):
            dy, x = self._nchw(t.diff, self.num_output), self._nchw(b.data, self.channels)
            dx = self._nchw(b.diff, self.channels) if propagate_down[i] else None
            if self.direct:
                depthwise_backward(dy, x, self.blobs[0].data, self.geom,
                                   self._work.setdefault(i, Workspace()), weight_diff,
                                   bias_diff, dx)
                continue
            kept = self._kept_for is b.data  # set for a single bottom only
            conv_backward_blocked(dy, x, self.blobs[0].data, self.geom,
                                  self._kept_scratch if kept else self._scratch, weight_diff,
                                  bias_diff, dx, kept)
