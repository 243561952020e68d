"""Spatial pyramid pooling: prototxt type ``SPP``, configured by ``spp_param`` (SPPParameter:
``pyramid_height``, ``pool`` MAX | AVE | STOCHASTIC)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from engine import caffe_pb2
from engine.blob import Blob
from engine.errors import LayerError
from engine.layer import Layer, create_layer, register_layer

MAX_PYRAMID_HEIGHT = 32  # Caffe's pad < kernel check fails long before


def level_geometry(level: int, size: int) -> tuple[int, int]:
    """(kernel = stride, pad) of pyramid ``level`` along an axis of ``size`` cells: ``2^level``
    bins of ``ceil(size / 2^level)`` cells, the shortfall padded (half of it, rounded up)."""
    bins = 2 ** level
    kernel = math.ceil(size / bins)
    return kernel, (kernel * bins - size + 1) // 2


@register_layer
class SPP(Layer):
    """Pool each (n, c) plane over ``2^l x 2^l`` bins for ``l < pyramid_height``; concatenate.

    Shapes: bottom (N, C, H, W) -> top (N, C * sum_l bins_l) where level ``l`` is a Pooling
    with kernel = stride = ``ceil(H / 2^l)`` and pad ``(kernel * 2^l - H + 1) // 2`` (the same
    along W), flattened per image; levels follow one another, each channel-major. As in Caffe,
    ``pyramid_height: 1`` is that single pooling, unflattened: top (N, C, 1, 1). Built from
    Pooling layers, as Caffe composes Split, Pooling, Flatten and Concat.
    """

    n_bottom = (1, 1)
    n_top = (1, 1)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.spp_param
        self.height, self.method = p.pyramid_height, p.pool
        if self.height < 1:
            raise self.error(f"pyramid_height must be positive; got {self.height}")
        if self.height > MAX_PYRAMID_HEIGHT:  # 2^(h-1) bins a side: no plane is that wide
            raise self.error(f"pyramid_height {self.height} would pool into 2^{self.height - 1} "
                             f"bins a side; at most {MAX_PYRAMID_HEIGHT} levels")
        self.pools: list[Layer] = []
        self.pooled = [Blob((), self.dtype) for _ in range(self.height)]
        self.split = Blob((), self.dtype)  # the bottom's data, a diff of its own per level
        self._spatial: tuple[int, ...] = ()

    def _pooling(self, level: int, spatial: tuple[int, int]) -> Layer:
        param = caffe_pb2.LayerParameter(name=f"{self.name}_pool{level}", type="Pooling")
        q = param.pooling_param
        q.pool = self.method
        (q.kernel_h, q.pad_h), (q.kernel_w, q.pad_w) = (level_geometry(level, n)
                                                        for n in spatial)
        q.stride_h, q.stride_w = q.kernel_h, q.kernel_w
        return create_layer(param, self.phase, self.rng, self.dtype)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4 or min(shape[2:]) < 1:
            raise self.error(f"the bottom must have 4 axes (num, channels, height, width), none "
                             f"empty; got shape {shape}")
        self.split.reshape(shape)
        self.split.share_data(bottom[0])
        if shape[2:] != self._spatial:  # the pyramid depends on the plane size
            self._spatial = shape[2:]
            self.pools = [self._pooling(level, shape[2:]) for level in range(self.height)]
            for pool, pooled in zip(self.pools, self.pooled, strict=True):
                self._run(pool.setup, pool, pooled)
        for pool, pooled in zip(self.pools, self.pooled, strict=True):
            self._run(pool.reshape, pool, pooled)
        if self.height == 1:
            top[0].reshape(self.pooled[0].shape)
        else:
            sizes = [math.prod(b.shape[1:]) for b in self.pooled]
            top[0].reshape((shape[0], sum(sizes)))
            ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
            self.columns = [slice(end - size, end) for size, end in zip(sizes, ends, strict=True)]

    def _run(self, method, pool: Layer, pooled: Blob) -> None:
        try:
            method([self.split], [pooled])
        except LayerError as error:
            raise self.error(f"cannot pool a {self._spatial} plane into the pyramid: "
                             f"{error}") from error

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.split.share_data(bottom[0])
        if self.height == 1:
            self.pools[0].forward([self.split], top)
            return
        n = bottom[0].shape[0]
        for pool, pooled, columns in zip(self.pools, self.pooled, self.columns, strict=True):
            pool.forward([self.split], [pooled])
            top[0].data[:, columns] = pooled.data.reshape(n, -1)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        self.split.share_data(bottom[0])
        if self.height == 1:
            self.pools[0].backward(top, [True], [self.split])
            bottom[0].diff[...] = self.split.diff
            return
        for level, (pool, pooled) in enumerate(zip(self.pools, self.pooled, strict=True)):
            pooled.diff[...] = top[0].diff[:, self.columns[level]].reshape(pooled.shape)
            pool.backward([pooled], [True], [self.split])
            if level == 0:
                bottom[0].diff[...] = self.split.diff
            else:
                bottom[0].diff += self.split.diff
