"""Split, Flatten, Reshape: shapes, values, views, gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import in_place_layer, make_layer, random_blob

from engine.errors import LayerError


# -- Split -----------------------------------------------------------------------------------
def test_split_tops_share_data_and_backward_sums():
    bottom = random_blob((2, 3))
    layer, top = make_layer('type: "Split"', [bottom], n_top=3)
    layer.forward([bottom], top)
    for t in top:
        assert t.shape == (2, 3)
        assert np.shares_memory(t.data, bottom.data)
        np.testing.assert_array_equal(t.data, bottom.data)
    for j, t in enumerate(top):
        t.diff[...] = j + 1
    layer.backward(top, [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, np.full((2, 3), 6.0))


@pytest.mark.parametrize("n_top", [1, 2, 3])
def test_split_gradient(n_top):
    bottom = random_blob((2, 3), seed=1)
    layer, top = make_layer('type: "Split"', [bottom], n_top=n_top)
    check_gradient(layer, [bottom], top)


def test_split_follows_a_reshaped_bottom():
    bottom = random_blob((2, 3))
    layer, top = make_layer('type: "Split"', [bottom], n_top=2)
    bottom.reshape(4, 5)
    bottom.data[...] = 1
    layer.reshape([bottom], top)
    layer.forward([bottom], top)
    assert top[1].shape == (4, 5) and np.all(top[1].data == 1)


def test_split_in_place_is_an_error():
    with pytest.raises(LayerError, match="in-place"):
        in_place_layer('type: "Split"', [random_blob((2, 3))])


# -- Flatten ---------------------------------------------------------------------------------
@pytest.mark.parametrize("param, shape", [
    ("", (2, 60)),
    ("flatten_param { axis: 2 }", (2, 3, 20)),
    ("flatten_param { end_axis: 2 }", (2, 12, 5)),
    ("flatten_param { axis: -3 end_axis: -2 }", (2, 12, 5)),
    ("flatten_param { axis: 0 }", (120,)),
    ("flatten_param { axis: 3 }", (2, 3, 4, 5)),
])
def test_flatten_shapes_and_values(param, shape):
    bottom = random_blob((2, 3, 4, 5))
    layer, top = make_layer(f'type: "Flatten" {param}', [bottom])
    layer.forward([bottom], top)
    assert top[0].shape == shape
    np.testing.assert_array_equal(top[0].data, bottom.data.reshape(shape))


def test_flatten_top_is_a_view_of_bottom_data_and_diff():
    bottom = random_blob((2, 3, 2))
    layer, top = make_layer('type: "Flatten"', [bottom])
    layer.forward([bottom], top)
    assert np.shares_memory(top[0].data, bottom.data)
    top[0].diff[...] = np.arange(12.0).reshape(2, 6)
    layer.backward(top, [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, np.arange(12.0).reshape(2, 3, 2))


def test_flatten_copies_when_the_view_was_broken():
    bottom = random_blob((2, 3, 2))
    layer, top = make_layer('type: "Flatten"', [bottom])
    top[0].reshape(5)  # someone reallocates the top behind the layer's back
    top[0].reshape(2, 6)
    layer.forward([bottom], top)
    np.testing.assert_array_equal(top[0].data, bottom.data.reshape(2, 6))
    top[0].diff[...] = 3
    layer.backward(top, [True], [bottom])
    assert np.all(bottom.diff == 3)


def test_flatten_gradient():
    bottom = random_blob((2, 3, 2), seed=2)
    layer, top = make_layer('type: "Flatten" flatten_param { axis: 1 }', [bottom])
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize("text, match", [
    ('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', "end_axis"),
    ('type: "Flatten" flatten_param { axis: 5 }', "axis"),
])
def test_flatten_errors(text, match):
    with pytest.raises(LayerError, match=match):
        make_layer(text, [random_blob((2, 3, 4))])


def test_flatten_in_place_is_an_error():
    with pytest.raises(LayerError, match="in-place"):
        in_place_layer('type: "Flatten"', [random_blob((2, 3))])


# -- Reshape ---------------------------------------------------------------------------------
# the equivalent specifications listed in Caffe's ReshapeParameter documentation (2 x 8 input)
@pytest.mark.parametrize("param, shape", [
    ("shape { dim: 2 dim: 2 dim: 4 }", (2, 2, 4)),
    ("shape { dim: 0 dim: 2 dim: 4 }", (2, 2, 4)),
    ("shape { dim: 0 dim: 2 dim: -1 }", (2, 2, 4)),
    ("shape { dim: 0 dim: -1 dim: 4 }", (2, 2, 4)),
    ("shape { dim: 2 dim: 4 } axis: 1", (2, 2, 4)),
    ("shape { dim: 2 dim: 4 } axis: -2", (2, 2, 4)),
    ("shape { dim: 1 dim: 2 dim: 8 }", (1, 2, 8)),
    ("shape { dim: 1 dim: 2 } num_axes: 1", (1, 2, 8)),
    ("shape { dim: 1 } num_axes: 0", (1, 2, 8)),
    ("shape { dim: 2 dim: 1 dim: 8 }", (2, 1, 8)),
    ("shape { dim: 1 } axis: 1 num_axes: 0", (2, 1, 8)),
    ("shape { dim: 1 } axis: -1", (2, 8, 1)),
    ("shape { dim: -1 }", (16,)),
    ("shape { dim: 0 dim: -1 }", (2, 8)),
])
def test_reshape_caffe_doc_cases(param, shape):
    bottom = random_blob((2, 8))
    layer, top = make_layer(f'type: "Reshape" reshape_param {{ {param} }}', [bottom])
    layer.forward([bottom], top)
    assert top[0].shape == shape
    np.testing.assert_array_equal(top[0].data.ravel(), bottom.data.ravel())


def test_reshape_follows_batch_size_changes():
    # Caffe's test: 0 copies N, -1 takes the rest, on a bottom that later changes shape
    bottom = random_blob((2, 3, 6, 5))
    layer, top = make_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: 3 dim: -1 } }',
                            [bottom])
    assert top[0].shape == (2, 3, 30)
    bottom.reshape(4, 3, 2, 5)
    layer.reshape([bottom], top)
    assert top[0].shape == (4, 3, 10)


def test_reshape_is_a_view_and_backward_passes_diff():
    bottom = random_blob((2, 3, 2), seed=3)
    layer, top = make_layer('type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } }',
                            [bottom])
    assert np.shares_memory(top[0].data, bottom.data)
    assert np.shares_memory(top[0].diff, bottom.diff)
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize("param, match", [
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: 3 dim: 5 }", "count must match"),
    ("shape { dim: 3 dim: -1 }", "not divisible"),
    ("shape { dim: 0 dim: 0 dim: 0 }", "no axis 2 to copy"),
    ("shape { dim: 2 } axis: 3", "out of range"),
    ("shape { dim: 2 } axis: 1 num_axes: 2", "past the last axis"),
    ("shape { dim: 2 } num_axes: -2", "num_axes"),
])
def test_reshape_errors(param, match):
    with pytest.raises(LayerError, match=match):
        make_layer(f'type: "Reshape" reshape_param {{ {param} }}', [random_blob((2, 8))])


def test_reshape_in_place_is_an_error():
    with pytest.raises(LayerError, match="in-place"):
        in_place_layer('type: "Reshape" reshape_param { shape { dim: -1 } }',
                       [random_blob((2, 3))])


@pytest.mark.parametrize("text, n_bottom, n_top", [
    ('type: "Split"', 1, 2),
    ('type: "Flatten"', 1, 1),
    ('type: "Reshape" reshape_param { shape { dim: -1 } }', 1, 1),
    ('type: "Concat"', 2, 1),
    ('type: "Eltwise" eltwise_param { coeff: 0.5 coeff: 2 }', 2, 1),
    ('type: "Eltwise" eltwise_param { operation: PROD }', 2, 1),
    ('type: "Eltwise" eltwise_param { operation: MAX }', 2, 1),
])
def test_float32_stays_float32(text, n_bottom, n_top):
    bottom = [random_blob((2, 3, 2), seed=i, dtype=np.float32) for i in range(n_bottom)]
    layer, top = make_layer(text, bottom, n_top=n_top, dtype=np.float32)
    layer.forward(bottom, top)
    for t in top:
        t.diff[...] = 1
    layer.backward(top, [True] * n_bottom, bottom)
    assert all(t.data.dtype == np.float32 for t in top)
    assert all(b.diff.dtype == np.float32 for b in bottom)
