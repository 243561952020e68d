"""ShuffleChannel, as ShuffleNet v1/v2 ports define it (farmingyard/ShuffleNet): prototxt type
``ShuffleChannel``, configured by ``shuffle_channel_param { group }``."""

from __future__ import annotations

from collections.abc import Sequence

from engine.blob import Blob
from engine.layer import Layer, register_layer


@register_layer
class ShuffleChannel(Layer):
    """The channel shuffle: channels seen as a (group, C/group) grid, transposed.

    ``top[:, j*group + i] = bottom[:, i*(C/group) + j]``, so each group's channels are dealt out
    one at a time across the groups. Shapes: bottom (N, C, ...) -> top of the same shape; in
    place too.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.group = self.param.shuffle_channel_param.group
        if self.group < 1:
            raise self.error(f"group must be positive; got {self.group}")

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) < 2 or shape[1] % self.group:
            raise self.error(f"the bottom's channels (axis 1) must split into group "
                             f"{self.group}; got shape {shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(shape)

    def _grid(self, array, rows: int):
        """``array`` (N, C, ...) as (N, rows, C/rows, rest)."""
        return array.reshape(array.shape[0], rows, array.shape[1] // rows, -1)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = self._grid(bottom[0].data, self.group)
        if top[0] is bottom[0]:  # in place: read from a copy
            x = x.copy()
        self._grid(top[0].data, x.shape[2])[...] = x.transpose(0, 2, 1, 3)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if propagate_down[0]:
            dy = self._grid(top[0].diff, bottom[0].shape[1] // self.group)
            if top[0] is bottom[0]:
                dy = dy.copy()
            self._grid(bottom[0].diff, self.group)[...] = dy.transpose(0, 2, 1, 3)
