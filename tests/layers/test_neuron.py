"""ReLU, Sigmoid, TanH and Dropout: shapes, forward values, gradients, in-place backward."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob, run_forward_backward

from engine.errors import LayerError
from engine.layer import TEST

X = np.array([[-2.0, -0.5, 0.0], [0.5, 3.0, -1e-3]])

NEURONS = [
    'type: "ReLU"',
    'type: "ReLU" relu_param { negative_slope: 0.1 }',
    'type: "ReLU" relu_param { negative_slope: -0.5 }',
    'type: "Sigmoid"',
    'type: "TanH"',
    'type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
]


run = run_forward_backward


@pytest.mark.parametrize("text", NEURONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_and_dtype(text, dtype):
    bottom = random_blob((2, 3, 4, 5), dtype=dtype)
    layer, top = make_layer(text, [bottom], dtype=dtype)
    layer.forward([bottom], top)
    assert top[0].shape == (2, 3, 4, 5)
    assert top[0].data.dtype == dtype
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    assert bottom.diff.dtype == dtype


@pytest.mark.parametrize("slope, y, dx", [
    (0.0, [[0, 0, 0], [0.5, 3, 0]], [[0, 0, 0], [1, 1, 0]]),
    (0.1, [[-0.2, -0.05, 0], [0.5, 3, -1e-4]], [[0.1, 0.1, 0.1], [1, 1, 0.1]]),
    (-1.0, [[2, 0.5, 0], [0.5, 3, 1e-3]], [[-1, -1, -1], [1, 1, -1]]),
])
def test_relu_forward_backward(slope, y, dx):
    text = f'type: "ReLU" relu_param {{ negative_slope: {slope} }}'
    top, bottom_diff = run(text, X, np.ones_like(X), in_place=False)
    np.testing.assert_allclose(top, y, atol=1e-12)
    # the gradient at x == 0 takes the slope side, as Caffe's (x > 0) + slope * (x <= 0)
    np.testing.assert_allclose(bottom_diff, dx, atol=1e-12)


def test_sigmoid_forward_matches_logistic_without_overflow():
    x = np.array([-100.0, -3.0, 0.0, 0.25, 3.0, 100.0])
    with np.errstate(all="raise"):
        y, dx = run('type: "Sigmoid"', x, np.ones_like(x), in_place=False)
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-x)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx, y * (1 - y), rtol=1e-12, atol=1e-15)
    # Caffe's tanh form saturates to exactly 0 and 1 (1/(1+e^100) would be 3.7e-44)
    assert (y[0], y[2], y[-1]) == (0.0, 0.5, 1.0)


def test_tanh_forward_backward():
    y, dx = run('type: "TanH"', X, 2 * np.ones_like(X), in_place=False)
    np.testing.assert_allclose(y, np.tanh(X), rtol=1e-14)
    np.testing.assert_allclose(dx, 2 * (1 - np.tanh(X) ** 2), rtol=1e-14)


@pytest.mark.parametrize("text, kink", [
    ('type: "ReLU"', 0.0),
    ('type: "ReLU" relu_param { negative_slope: 0.01 }', 0.0),
    ('type: "Sigmoid"', None),
    ('type: "TanH"', None),
    ('type: "Dropout"', None),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.8 }', None),
])
def test_gradient(text, kink):
    bottom = random_blob((2, 3, 2, 2), seed=1, low=-2, high=2)
    layer, top = make_layer(text, [bottom])
    check_gradient(layer, [bottom], top, kink=kink, kink_range=0.01)


@pytest.mark.parametrize("text", NEURONS)
def test_in_place_matches_out_of_place(text):
    x = np.random.default_rng(3).uniform(-2, 2, (3, 4, 5))
    dy = np.random.default_rng(4).standard_normal(x.shape)
    y_out, dx_out = run(text, x, dy, in_place=False)
    y_in, dx_in = run(text, x, dy, in_place=True)
    np.testing.assert_array_equal(y_in, y_out)
    np.testing.assert_array_equal(dx_in, dx_out)


@pytest.mark.parametrize("in_place", [False, True])
def test_dropout_test_phase_is_identity(in_place):
    x = np.random.default_rng(0).standard_normal((4, 5))
    dy = np.random.default_rng(1).standard_normal((4, 5))
    y, dx = run('type: "Dropout" dropout_param { dropout_ratio: 0.9 }', x, dy, in_place, TEST)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
def test_dropout_train_scales_kept_units_and_reuses_mask(ratio):
    x = np.random.default_rng(0).uniform(1, 2, (100, 100))  # nonzero, so y == 0 marks a drop
    dy = np.random.default_rng(1).standard_normal(x.shape)
    y, dx = run(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', x, dy, False)
    kept = y != 0
    scale = 1 / (1 - float(np.float32(ratio)))  # the proto field is a float
    np.testing.assert_allclose(y[kept], x[kept] * scale, rtol=1e-15)
    np.testing.assert_array_equal(dx, np.where(kept, dy * scale, 0))
    # 10^4 Bernoulli draws: the kept fraction is within 5 standard deviations of 1 - ratio
    sd = np.sqrt(ratio * (1 - ratio) / kept.size)
    assert abs(kept.mean() - (1 - ratio)) < 5 * sd


@pytest.mark.parametrize("in_place", [False, True])
def test_dropout_sample_weights_test_drops_in_test_too(in_place):
    """SegNet/ENet forks (Bayesian SegNet): TEST behaves as TRAIN, mask and scale alike."""
    x = np.random.default_rng(0).uniform(1, 2, (60, 60))
    dy = np.random.default_rng(1).standard_normal(x.shape)
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.5 sample_weights_test: true }'
    y, dx = run(text, x, dy, in_place, TEST)
    kept = y != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(y[kept], 2 * x[kept], rtol=1e-15)
    np.testing.assert_array_equal(dx, np.where(kept, 2 * dy, 0))
    y_train, _ = run(text, x, dy, in_place)
    np.testing.assert_array_equal(y_train, y)  # the same draws from the same seed


def test_dropout_draws_a_new_mask_each_forward_from_the_layer_rng():
    bottom = blob_of(np.ones((50, 50)))
    layer, top = make_layer('type: "Dropout"', [bottom], seed=5)
    layer.forward([bottom], top)
    first = top[0].data.copy()
    layer.forward([bottom], top)
    assert not np.array_equal(first, top[0].data)
    again, top2 = make_layer('type: "Dropout"', [bottom], seed=5)
    again.forward([bottom], top2)
    np.testing.assert_array_equal(top2[0].data, first)


def test_dropout_float32_scale_is_rounded_like_caffe():
    x = np.ones(1000, np.float32)
    y, _ = run('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', x, x, False,
               dtype=np.float32)
    assert y.dtype == np.float32
    assert set(np.unique(y)) == {np.float32(0), np.float32(1 / (1 - np.float32(0.3)))}


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_dropout_rejects_bad_ratio(ratio):
    with pytest.raises(LayerError, match="dropout_ratio"):
        make_layer(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}',
                   [random_blob((2, 2))])


def test_no_propagate_down_leaves_bottom_diff():
    bottom = random_blob((2, 3))
    bottom.diff[...] = 7
    layer, top = make_layer('type: "ReLU"', [bottom])
    layer.forward([bottom], top)
    top[0].diff[...] = 1
    layer.backward(top, [False], [bottom])
    assert np.all(bottom.diff == 7)
