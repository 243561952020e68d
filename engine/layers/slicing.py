"""Slicing layers: prototxt types ``Slice`` (``slice_param``: SliceParameter ``axis``,
``slice_point``, legacy ``slice_dim``), ``Crop`` (``crop_param``: CropParameter ``axis``,
``offset``) and ``Tile`` (``tile_param``: TileParameter ``axis``, ``tiles``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, register_layer


def _canonical_axis(layer: Layer, axis: int, blob: Blob) -> int:
    if not -blob.num_axes <= axis < blob.num_axes:
        raise layer.error(f"axis {axis} is out of range for a bottom of shape {blob.shape}")
    return axis % blob.num_axes


@register_layer
class Slice(Layer):
    """Split the bottom along ``axis`` into consecutive pieces, one per top.

    Shapes: bottom (..., D, ...) -> tops (..., D_i, ...) with ``sum(D_i) = D``; piece ``i`` ends
    at ``slice_point[i]`` (one point fewer than tops). No points: ``D`` splits equally. The
    legacy ``slice_dim``, when given, is the axis (Caffe reads it before ``axis``).
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (1, 1)
    n_top = (1, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.slice_param
        if p.HasField("slice_dim"):
            if p.HasField("axis"):
                raise self.error("give either axis or the legacy slice_dim, not both")
            self.axis = _canonical_axis(self, p.slice_dim, bottom[0])
        else:
            self.axis = _canonical_axis(self, p.axis, bottom[0])
        self.points = [int(v) for v in p.slice_point]
        if self.points and len(self.points) != len(top) - 1:
            raise self.error(f"{len(top)} tops need {len(top) - 1} slice_point values; got "
                             f"{len(self.points)}")

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        size = shape[self.axis]
        if self.points:
            bounds = [0, *self.points, size]
            if any(b >= e for b, e in itertools.pairwise(bounds)):
                raise self.error(f"slice_point must increase strictly inside (0, {size}) on "
                                 f"axis {self.axis}; got {self.points}")
        else:
            if size % len(top):
                raise self.error(f"axis {self.axis} of size {size} does not split equally "
                                 f"into {len(top)} tops")
            step = size // len(top)
            bounds = list(range(0, size + 1, step))
        self.bounds = list(itertools.pairwise(bounds))
        for t, (begin, end) in zip(top, self.bounds, strict=True):
            t.reshape((*shape[:self.axis], end - begin, *shape[self.axis + 1:]))

    def _piece(self, array: np.ndarray, i: int) -> np.ndarray:
        begin, end = self.bounds[i]
        return array[(slice(None),) * self.axis + (slice(begin, end),)]

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        for i, t in enumerate(top):
            t.data[...] = self._piece(bottom[0].data, i)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            for i, t in enumerate(top):
                self._piece(bottom[0].diff, i)[...] = t.diff


@register_layer
class Crop(Layer):
    """``top = bottom[0][..., o_a : o_a + S_a, ...]`` for every axis ``a >= axis``.

    Shapes: bottom 0 (D_0, ..., D_k), bottom 1 (the size reference, same axis count) ->
    top: bottom 0's shape before ``axis``, bottom 1's from ``axis`` on. ``offset``: none = 0,
    one = the same for every cropped axis, else one per cropped axis. Backward writes the top
    diff into the cropped window of bottom 0's diff, zeros elsewhere; bottom 1 gets none.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (2, 2)
    n_top = (1, 1)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.crop_param
        if bottom[0].num_axes != bottom[1].num_axes:
            raise self.error(f"both bottoms need the same number of axes; got shapes "
                             f"{bottom[0].shape} and {bottom[1].shape}")
        self.axis = _canonical_axis(self, p.axis, bottom[0])
        n_cropped = bottom[0].num_axes - self.axis
        offsets = [int(v) for v in p.offset]
        if len(offsets) > 1 and len(offsets) != n_cropped:
            raise self.error(f"offset must be given 0, 1 or {n_cropped} times (once per "
                             f"cropped axis); got {len(offsets)} values")
        self.offsets = offsets * n_cropped if len(offsets) == 1 else offsets or [0] * n_cropped

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        source, target = bottom[0].shape, bottom[1].shape
        shape = (*source[:self.axis], *target[self.axis:])
        for a, offset in enumerate(self.offsets, self.axis):
            if source[a] - offset < target[a]:
                raise self.error(f"cannot crop {target[a]} cells at offset {offset} from axis "
                                 f"{a} of size {source[a]} (bottom 0 {source}, bottom 1 "
                                 f"{target})")
        self.window = (slice(None),) * self.axis + tuple(
            slice(o, o + n) for o, n in zip(self.offsets, shape[self.axis:], strict=True))
        top[0].reshape(shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].data[...] = bottom[0].data[self.window]

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            bottom[0].diff[self.window] = top[0].diff


@register_layer
class Tile(Layer):
    """Repeat the block of axes ``axis..`` ``tiles`` times along ``axis``.

    Shapes: bottom (..., D_axis, ...) -> top (..., tiles * D_axis, ...). As in Caffe, the
    whole trailing block repeats (``[x, x, x]`` along ``axis``, not ``[x0, x0, x1, x1]``).
    Backward sums the copies.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (1, 1)
    n_top = (1, 1)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.tile_param
        self.axis = _canonical_axis(self, p.axis, bottom[0])
        self.tiles = p.tiles
        if self.tiles < 1:
            raise self.error(f"tiles must be positive; got {self.tiles}")

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        self.outer = int(np.prod(shape[:self.axis], dtype=np.int64))
        top[0].reshape((*shape[:self.axis], shape[self.axis] * self.tiles,
                        *shape[self.axis + 1:]))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data.reshape(self.outer, 1, -1)
        top[0].data.reshape(self.outer, self.tiles, -1)[...] = x

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.tiles, -1)
            np.sum(dy, axis=1, out=bottom[0].diff.reshape(self.outer, -1))
