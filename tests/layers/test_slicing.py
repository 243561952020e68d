"""Slice, Crop, Tile: shapes, values against numpy slicing, gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import make_layer, random_blob

from engine.errors import LayerError

# -- Slice -----------------------------------------------------------------------------------
# (bottom shape, slice_param, n_top, top shapes)
SLICES = [
    ((2, 6, 3), "", 3, [(2, 2, 3)] * 3),
    ((2, 6, 3), "slice_point: 1 slice_point: 4", 3, [(2, 1, 3), (2, 3, 3), (2, 2, 3)]),
    ((4, 5), "axis: 0 slice_point: 3", 2, [(3, 5), (1, 5)]),
    ((2, 3, 4), "axis: -1", 2, [(2, 3, 2), (2, 3, 2)]),
    ((6, 2), "slice_dim: 0 slice_point: 2", 2, [(2, 2), (4, 2)]),
    ((2, 3), "", 1, [(2, 3)]),
]


@pytest.mark.parametrize(("shape", "params", "n_top", "expected"), SLICES)
def test_slice_shapes_values_and_gradient(shape, params, n_top, expected):
    bottom = random_blob(shape)
    layer, top = make_layer(f'type: "Slice" slice_param {{ {params} }}', [bottom], n_top=n_top)
    assert [t.shape for t in top] == expected
    layer.forward([bottom], top)
    axis = layer.axis
    np.testing.assert_array_equal(np.concatenate([t.data for t in top], axis=axis), bottom.data)
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize(("shape", "params", "n_top", "message"), [
    ((2, 5), "", 2, "split equally"),
    ((2, 6), "slice_point: 2", 3, "slice_point"),
    ((2, 6), "slice_point: 4 slice_point: 2", 3, "increase strictly"),
    ((2, 6), "slice_point: 6", 2, "increase strictly"),
    ((2, 6), "axis: 2", 2, "out of range"),
    ((2, 6), "axis: 1 slice_dim: 1", 2, "not both"),
])
def test_slice_errors(shape, params, n_top, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'type: "Slice" slice_param {{ {params} }}', [random_blob(shape)],
                   n_top=n_top)


# -- Crop ------------------------------------------------------------------------------------
# (bottom 0 shape, bottom 1 shape, crop_param, top shape, window into bottom 0)
CROPS = [
    ((2, 3, 6, 7), (1, 1, 4, 4), "", (2, 3, 4, 4), np.s_[:, :, 0:4, 0:4]),
    ((2, 3, 6, 7), (1, 1, 4, 4), "offset: 1", (2, 3, 4, 4), np.s_[:, :, 1:5, 1:5]),
    ((2, 3, 6, 7), (1, 1, 4, 4), "offset: 2 offset: 3", (2, 3, 4, 4), np.s_[:, :, 2:6, 3:7]),
    ((2, 3, 6, 7), (1, 2, 5, 5), "axis: 1 offset: 1 offset: 0 offset: 2", (2, 2, 5, 5),
     np.s_[:, 1:3, 0:5, 2:7]),
    ((4, 5), (2, 3), "axis: 0 offset: 1", (2, 3), np.s_[1:3, 1:4]),
]


@pytest.mark.parametrize(("shape", "ref", "params", "expected", "window"), CROPS)
def test_crop_shapes_values_and_gradient(shape, ref, params, expected, window):
    bottom = [random_blob(shape), random_blob(ref, seed=1)]
    layer, top = make_layer(f'type: "Crop" crop_param {{ {params} }}', bottom)
    assert top[0].shape == expected
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, bottom[0].data[window])
    top[0].diff[...] = 1
    bottom[0].diff[...] = 7  # stale values must be overwritten
    layer.backward(top, [True, False], bottom)
    want = np.zeros(shape)
    want[window] = 1
    np.testing.assert_array_equal(bottom[0].diff, want)
    assert not layer.allow_force_backward(1)
    check_gradient(layer, bottom, top, check_bottom=[0])


@pytest.mark.parametrize(("shape", "ref", "params", "message"), [
    ((2, 3, 6, 6), (2, 3, 4, 4), "offset: 3", "cannot crop"),
    ((2, 3, 6, 6), (2, 3, 7, 4), "", "cannot crop"),
    ((2, 3, 6, 6), (2, 3, 4, 4), "offset: 1 offset: 1 offset: 1", "0, 1 or 2"),
    ((2, 3, 6, 6), (2, 3, 4), "", "same number of axes"),
    ((2, 3, 6, 6), (2, 3, 4, 4), "axis: 4", "out of range"),
])
def test_crop_errors(shape, ref, params, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'type: "Crop" crop_param {{ {params} }}',
                   [random_blob(shape), random_blob(ref)])


# -- Tile ------------------------------------------------------------------------------------
# (bottom shape, tile_param, top shape)
TILES = [
    ((2, 3, 2), "tiles: 3", (2, 9, 2)),
    ((2, 3, 2), "axis: 0 tiles: 2", (4, 3, 2)),
    ((2, 3, 2), "axis: -1 tiles: 4", (2, 3, 8)),
    ((2, 3), "tiles: 1", (2, 3)),
]


@pytest.mark.parametrize(("shape", "params", "expected"), TILES)
def test_tile_shapes_values_and_gradient(shape, params, expected):
    bottom = random_blob(shape)
    layer, top = make_layer(f'type: "Tile" tile_param {{ {params} }}', [bottom])
    assert top[0].shape == expected
    layer.forward([bottom], top)
    axis, tiles = layer.axis, layer.tiles
    # Caffe repeats the whole trailing block: np.tile on the axes from `axis` on.
    reps = [1] * axis + [tiles] + [1] * (len(shape) - axis - 1)
    np.testing.assert_array_equal(top[0].data, np.tile(bottom.data, reps))
    check_gradient(layer, [bottom], top)


def test_tile_backward_sums_the_copies():
    bottom = random_blob((1, 2))
    layer, top = make_layer('type: "Tile" tile_param { tiles: 3 }', [bottom])
    top[0].diff[...] = np.arange(6.0).reshape(1, 6)
    layer.backward(top, [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, [[0 + 2 + 4, 1 + 3 + 5]])


@pytest.mark.parametrize(("params", "message"), [
    ("", "tiles must be positive"),
    ("tiles: 0", "tiles must be positive"),
    ("axis: 3 tiles: 2", "out of range"),
])
def test_tile_errors(params, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'type: "Tile" tile_param {{ {params} }}', [random_blob((2, 3))])
