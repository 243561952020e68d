"""ShuffleChannel: shapes, forward against the fork's copy loop, gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import in_place_layer, make_layer, random_blob

from engine.errors import LayerError


def shuffle(group: int, bottom):
    return make_layer(f'type: "ShuffleChannel" shuffle_channel_param {{ group: {group} }}',
                      [bottom])


def naive_shuffle(x: np.ndarray, group: int) -> np.ndarray:
    """farmingyard's loop: input channel i*cols + j goes to output channel j*group + i."""
    cols = x.shape[1] // group
    y = np.empty_like(x)
    for i in range(group):
        for j in range(cols):
            y[:, j * group + i] = x[:, i * cols + j]
    return y


@pytest.mark.parametrize(("shape", "group"), [((2, 6, 3, 4), 2), ((2, 6, 3, 4), 3),
                                              ((1, 12, 2, 2), 4), ((3, 8), 2),
                                              ((2, 4, 3), 1), ((1, 6, 2, 2, 2), 3)])
def test_forward_matches_naive_loop(shape, group):
    x = random_blob(shape, seed=1)
    layer, top = shuffle(group, x)
    assert top[0].shape == shape
    layer.forward([x], top)
    np.testing.assert_array_equal(top[0].data, naive_shuffle(x.data, group))


def test_hand_computed():
    x = random_blob((1, 6, 1, 1))
    x.data[0, :, 0, 0] = np.arange(6)
    layer, top = shuffle(2, x)
    layer.forward([x], top)
    assert top[0].data.ravel().tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("group", [2, 3])
def test_gradient(group):
    x = random_blob((2, 6, 2, 3), seed=2)
    layer, top = shuffle(group, x)
    assert check_gradient(layer, [x], top) > 0


def test_in_place_matches_out_of_place():
    x = random_blob((2, 6, 2, 3), seed=4)
    expected = naive_shuffle(x.data, 3)
    dy = np.random.default_rng(5).standard_normal(x.shape)
    layer, top = in_place_layer('type: "ShuffleChannel" shuffle_channel_param { group: 3 }', [x])
    layer.forward([x], top)
    np.testing.assert_array_equal(x.data, expected)
    x.diff[...] = dy
    layer.backward(top, [True], [x])
    np.testing.assert_array_equal(naive_shuffle(x.diff, 3), dy)  # the inverse permutation


def test_default_group_is_identity():
    x = random_blob((1, 4, 2, 2), seed=3)
    layer, top = make_layer('type: "ShuffleChannel"', [x])
    layer.forward([x], top)
    np.testing.assert_array_equal(top[0].data, x.data)


@pytest.mark.parametrize(("shape", "group", "message"), [((1, 6, 2, 2), 4, "split into group"),
                                                         ((1, 6, 2, 2), 0, "positive")])
def test_errors(shape, group, message):
    with pytest.raises(LayerError, match=message):
        shuffle(group, random_blob(shape))
