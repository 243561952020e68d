"""Segmentation forks' resampling layers: ``Upsample`` (upsample_param) and ``Interp``
(interp_param).

``Upsample`` is SegNet's max-unpooling (alexgkendall/caffe-segnet, copied unchanged into ENet's
TimoSaemann/caffe-enet); with a single bottom it is the nearest-neighbour upsampling that
YOLOv3 Caffe ports register under the same type name. ``Interp`` is DeepLab v2's bilinear
resize as PSPNet (hszhao/PSPNet) ships it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, register_layer


@register_layer
class Upsample(Layer):
    """Max-unpooling by a MAX Pooling mask (SegNet/ENet); one bottom: nearest upsampling.

    Bottoms (data, mask), both (N, C, H, W), the mask as MAX Pooling's second top (the flat
    index ``h * OW + w`` of each value's cell in the output plane).

    ``y = 0`` except ``y[n, c].flat[mask[n, c, i]] = x[n, c].flat[i]``; backward gathers
    ``dx[n, c, i] = dy[n, c].flat[mask[n, c, i]]``; the mask gets no gradient. Output size:
    ``upsample_h`` x ``upsample_w`` when given (the pooled layer's input size), else
    ``H * scale_h - pad_out_h`` x ``W * scale_w - pad_out_w`` (the fork's deprecated form;
    ``pad_out`` needs scale 2). Fork behaviour kept: when two cells share a target (overlapping
    pooling windows) the later one in row-major order wins the forward, yet both receive that
    target's gradient. Mask entries of -1 (a pooling window with no cell) are skipped, where the
    fork would write out of bounds.

    One bottom (YOLOv3 ports): nearest-neighbour, each cell repeated ``scale_h`` x ``scale_w``
    times; backward sums each block.
    """

    n_bottom = (1, 2)
    backward_needs_top_data = False  # backward reads the mask (bottom 1) only

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.upsample_param
        self.size: tuple[int, int] | None = None
        if p.HasField("upsample_h") or p.HasField("upsample_w"):
            if not (p.HasField("upsample_h") and p.HasField("upsample_w")):
                raise self.error("give upsample_h and upsample_w together")
            self.size = (int(p.upsample_h), int(p.upsample_w))
            if min(self.size) <= 1:
                raise self.error(f"upsample_h and upsample_w must be > 1; got {self.size}")
            if len(bottom) == 1:
                raise self.error("upsample_h/upsample_w need the mask bottom; with one bottom "
                                 "give scale (nearest-neighbour upsampling)")
            return
        if p.HasField("scale_h") != p.HasField("scale_w"):
            raise self.error("give scale_h and scale_w together")
        if p.HasField("scale_h") and p.HasField("scale"):
            raise self.error("give either scale or scale_h and scale_w, not both")
        self.scale = (int(p.scale_h), int(p.scale_w)) if p.HasField("scale_h") \
            else (int(p.scale),) * 2
        if min(self.scale) <= 1:
            raise self.error(f"the scale must be > 1; got {self.scale}")
        self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
        for axis, pad, scale in zip("hw", self.pad_out, self.scale, strict=True):
            if pad and scale != 2:
                raise self.error(f"pad_out_{axis} needs scale_{axis} 2 (the output size is "
                                 f"otherwise ill-defined); got scale {scale}")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"bottom 0 must have 4 axes (N, C, H, W); got shape {shape}")
        if len(bottom) == 1:
            top[0].reshape((*shape[:2], shape[2] * self.scale[0], shape[3] * self.scale[1]))
            return
        if bottom[1].shape != shape:
            raise self.error(f"the mask (bottom 1) must have the data's shape {shape}; got "
                             f"{bottom[1].shape}")
        out = self.size or tuple(n * s - pad for n, s, pad in
                                 zip(shape[2:], self.scale, self.pad_out, strict=True))
        top[0].reshape((*shape[:2], *out))

    def _targets(self, mask: Blob, top: Blob) -> np.ndarray:
        """Flat indices into the whole top of each bottom cell; -1 where the mask has none."""
        planes, cells = mask.shape[0] * mask.shape[1], top.shape[2] * top.shape[3]
        index = mask.data.reshape(planes, -1).astype(np.intp)  # C's static_cast<int>
        if index.size and index.max() >= cells:
            raise self.error(f"mask index {index.max()} is outside the {top.shape[2]}x"
                             f"{top.shape[3]} output; the Pooling layer that made the mask "
                             f"had a larger input: set upsample_h/upsample_w to its size")
        missing = index < 0
        index += (np.arange(planes, dtype=np.intp) * cells)[:, None]
        index[missing] = -1
        return index.reshape(-1)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        if len(bottom) == 1:
            np.copyto(top[0].data, x.repeat(self.scale[0], 2).repeat(self.scale[1], 3))
            return
        target = self._targets(bottom[1], top[0])
        values = x.reshape(-1)
        keep = target >= 0
        if not keep.all():
            target, values = target[keep], values[keep]
        y = top[0].data.reshape(-1)
        y.fill(0)
        y[target] = values
        if target.size and np.bincount(target, minlength=y.size).max() > 1:
            last = np.zeros(y.size, np.intp)  # numpy leaves repeated assignment unordered
            np.maximum.at(last, target, np.arange(target.size))
            y[target] = values[last[target]]

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if len(bottom) == 1:
            n, c, h, w = dx.shape
            blocks = dy.reshape(n, c, h, self.scale[0], w, self.scale[1])
            np.copyto(dx, blocks.sum(axis=(3, 5)))
            return
        target = self._targets(bottom[1], top[0])
        gathered = dy.reshape(-1)[np.maximum(target, 0)]
        np.copyto(dx.reshape(-1), np.where(target >= 0, gathered, 0))


def _interp_taps(n_in: int, n_out: int, dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """(i0, i1, w0, w1) per output index: ``out[j] = w0[j] * in[i0[j]] + w1[j] * in[i1[j]]``.

    The fork's float arithmetic: ``r = float(n_in - 1) / (n_out - 1)`` (0 for one output),
    ``pos = r * j`` in float32, ``i0 = int(pos)``, ``i1 = i0 + 1`` inside the input,
    ``w1 = pos - i0`` (float32, then the blob's type) and ``w0 = 1 - w1`` in the blob's type.
    """
    ratio = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    pos = ratio * np.arange(n_out, dtype=np.float32)
    i0 = pos.astype(np.intp)
    i1 = i0 + (i0 < n_in - 1)
    w1 = (pos - i0.astype(np.float32)).astype(dtype)
    return i0, i1, dtype.type(1) - w1, w1


def _sum_into(values: np.ndarray, index: np.ndarray, n: int, axis: int) -> np.ndarray:
    """``out[index[j]] += values[j]`` along ``axis`` for a non-decreasing ``index``: runs of
    equal indices are summed with one ``reduceat``."""
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    shape = list(values.shape)
    shape[axis] = n
    out = np.zeros(shape, values.dtype)
    where: list = [slice(None)] * values.ndim
    where[axis] = index[starts]
    out[tuple(where)] = np.add.reduceat(values, starts, axis=axis)
    return out


@register_layer
class Interp(Layer):
    """Bilinear resize with aligned corners (DeepLab v2, PSPNet).

    Output (Ho, Wo) samples the input at ``j * (n_in - 1) / (n_out - 1)`` along each axis
    (DeepLab v2's ``caffe_cpu_interp2``).

    The input is first cropped to ``H_eff = H + pad_beg + pad_end`` rows from row ``-pad_beg``
    (pads must be <= 0), and likewise for columns. Output size, in the fork's order of rules:
    ``shrink_factor`` s alone: ``(H_eff - 1) / s + 1`` (integer division); ``zoom_factor`` z
    alone: ``H_eff + (H_eff - 1) * (z - 1)``; ``height`` and ``width``: as given; both factors:
    shrink, then zoom. Backward is the adjoint (the gradient lands in the cropped region only).
    Shapes: bottom (N, C, H, W) -> top (N, C, Ho, Wo).
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.interp_param
        self.pad_beg, self.pad_end = int(p.pad_beg), int(p.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error(f"only non-positive pad_beg and pad_end (cropping) are supported, "
                             f"as in the fork; got pad_beg {self.pad_beg}, pad_end "
                             f"{self.pad_end}")
        self.shrink = int(p.shrink_factor) if p.HasField("shrink_factor") else None
        self.zoom = int(p.zoom_factor) if p.HasField("zoom_factor") else None
        self.fixed = (int(p.height), int(p.width)) \
            if p.HasField("height") and p.HasField("width") else None
        if self.shrink is None and self.zoom is None and self.fixed is None:
            raise self.error("give zoom_factor, shrink_factor, or height and width")
        for name, factor in (("shrink_factor", self.shrink), ("zoom_factor", self.zoom)):
            if factor is not None and factor < 1:
                raise self.error(f"{name} must be >= 1; got {factor}")
        self._key: tuple = ()

    def _out_size(self, n: int) -> int:
        if self.shrink is not None:
            n = (n - 1) // self.shrink + 1
        if self.zoom is not None:
            n = n + (n - 1) * (self.zoom - 1)
        return n

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"the bottom must have 4 axes (N, C, H, W); got shape {shape}")
        eff = tuple(n + self.pad_beg + self.pad_end for n in shape[2:])
        if min(eff) < 1:
            raise self.error(f"pad_beg {self.pad_beg} and pad_end {self.pad_end} crop the whole "
                             f"{shape[2]}x{shape[3]} input")
        if self.shrink is None and self.zoom is None:
            out = self.fixed
        else:
            out = tuple(self._out_size(n) for n in eff)
        if min(out) < 1:
            raise self.error(f"the output size {out} must be positive")
        top[0].reshape((*shape[:2], *out))
        key = (eff, out, bottom[0].dtype)
        if key != self._key:
            self._key = key
            self.eff, self.out = eff, out
            self.taps_h = _interp_taps(eff[0], out[0], bottom[0].dtype)
            self.taps_w = _interp_taps(eff[1], out[1], bottom[0].dtype)

    def _crop(self, a: np.ndarray) -> np.ndarray:
        start = -self.pad_beg
        return a[:, :, start:start + self.eff[0], start:start + self.eff[1]]

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = self._crop(bottom[0].data)
        if self.eff == self.out:
            np.copyto(top[0].data, x)
            return
        i0, i1, w0, w1 = self.taps_w
        rows = x[..., i0] * w0 + x[..., i1] * w1  # (N, C, H_eff, Wo)
        i0, i1, w0, w1 = self.taps_h
        np.copyto(top[0].data, w0[:, None] * rows[:, :, i0] + w1[:, None] * rows[:, :, i1])

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.eff != dx.shape[2:]:
            dx.fill(0)
        if self.eff == self.out:
            np.copyto(self._crop(dx), dy)
            return
        i0, i1, w0, w1 = self.taps_h
        h = self.eff[0]
        rows = _sum_into(dy * w0[:, None], i0, h, 2) + _sum_into(dy * w1[:, None], i1, h, 2)
        i0, i1, w0, w1 = self.taps_w
        w = self.eff[1]
        np.copyto(self._crop(dx), _sum_into(rows * w0, i0, w, 3) + _sum_into(rows * w1, i1, w, 3))
