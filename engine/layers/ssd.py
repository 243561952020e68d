"""The SSD fork's (weiliu89/caffe, branch ``ssd``) feature-map layers: ``Permute``
(``permute_param``) and ``Normalize`` (``norm_param``), both with backward."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine import caffe_pb2
from engine.blob import Blob
from engine.layer import Layer, register_layer


@register_layer
class Permute(Layer):
    """``top = bottom.transpose(order)``: new axis i is old axis ``order[i]``.

    ``order`` may name only the leading new axes; the axes it leaves out follow in their old
    order (the fork's rule), so SSD's ``order: 0 order: 2 order: 3 order: 1`` turns NCHW into
    NHWC. Shapes: bottom (d_0, ..., d_k) -> top (d_order[0], ..., d_order[k]).
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        n_axes = bottom[0].num_axes
        given = [int(o) for o in self.param.permute_param.order]
        if any(o >= n_axes for o in given) or len(set(given)) != len(given):
            raise self.error(f"order {given} must name distinct axes below {n_axes} (the "
                             f"bottom has shape {bottom[0].shape})")
        self.order = given + [a for a in range(n_axes) if a not in given]
        self.inverse = list(np.argsort(self.order))

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if bottom[0].num_axes != len(self.order):
            raise self.error(f"the bottom must keep its {len(self.order)} axes; got "
                             f"{bottom[0].shape}")
        top[0].reshape(tuple(bottom[0].shape[a] for a in self.order))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].data[...] = bottom[0].data.transpose(self.order)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.transpose(self.inverse)


@register_layer
class Normalize(Layer):
    """L2 normalisation with a learned scale (ParseNet; SSD's ``conv4_3_norm``).

    ``top = s * x / sqrt(sum(x^2) + eps)``, the sum over (C, H, W) per image when
    ``across_spatial``, else over C at each pixel. ``s`` is one scalar (``channel_shared``,
    a 0-d blob as the fork's) or one value per channel; ``scale_filler`` fills it (default
    constant 1). Shapes: bottom (N, C, ...) -> top of the same shape.
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.norm_param
        if bottom[0].num_axes < 2:
            raise self.error(f"needs a bottom with a channel axis; got shape {bottom[0].shape}")
        self.across_spatial, self.channel_shared, self.eps = (
            p.across_spatial, p.channel_shared, p.eps)
        filler = p.scale_filler
        if not p.HasField("scale_filler"):
            filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
        shape = () if self.channel_shared else (bottom[0].shape[1],)
        self.init_param_blobs([(shape, filler)])

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if not self.channel_shared and bottom[0].shape[1] != self.blobs[0].count:
            raise self.error(f"has {self.blobs[0].count} channel scales; the bottom has shape "
                             f"{bottom[0].shape}")
        top[0].reshape(bottom[0].shape)

    def _sum_axes(self, x: np.ndarray) -> tuple[int, ...]:
        return tuple(range(1, x.ndim)) if self.across_spatial else (1,)

    def _scale(self, x: np.ndarray) -> np.ndarray:
        """The scale, broadcastable against the (N, C, ...) bottom."""
        s = self.blobs[0].data
        return s if self.channel_shared else s.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        self.norm = np.sqrt(np.sum(x * x, axis=self._sum_axes(x), keepdims=True) + self.eps)
        np.multiply(x / self.norm, self._scale(x), out=top[0].data)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        x, dy = bottom[0].data, top[0].diff
        unit = x / self.norm
        if self.param_down(0):
            grad = dy * unit
            self.blobs[0].diff[...] += (grad.sum() if self.channel_shared
                                        else grad.sum(axis=(0, *range(2, x.ndim))))
        if propagate_down[0]:
            g = dy * self._scale(x)  # d loss / d unit
            along = np.sum(g * unit, axis=self._sum_axes(x), keepdims=True)
            bottom[0].diff[...] = (g - unit * along) / self.norm
