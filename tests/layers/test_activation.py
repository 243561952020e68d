"""PReLU, ELU, AbsVal, BNLL, Power, Exp, Log, Threshold, Clip and Swish: shapes, forward against
per-element references, gradients, in-place backward, Caffe's special cases and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, layer_param, make_layer, random_blob, run_forward_backward

from engine.errors import LayerError
from engine.layer import TRAIN, create_layer


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def bnll(x: float) -> float:
    return x + math.log(1 + math.exp(-x)) if x > 0 else math.log(1 + math.exp(x))


# (prototxt, per-element reference y(x), input range): every layer without parameters
ELEMENTWISE = [
    ('type: "ELU"', lambda x: x if x > 0 else math.exp(x) - 1, (-3, 3)),
    ('type: "ELU" elu_param { alpha: 0.5 }', lambda x: x if x > 0 else 0.5 * (math.exp(x) - 1),
     (-3, 3)),
    ('type: "AbsVal"', abs, (-3, 3)),
    ('type: "BNLL"', bnll, (-5, 5)),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }',
     lambda x: (1 + 0.5 * x) ** 2, (-3, 3)),
    ('type: "Power" power_param { power: 0.5 scale: 2 shift: 7 }',
     lambda x: math.sqrt(7 + 2 * x), (-3, 3)),
    ('type: "Power" power_param { power: -1.5 scale: -1 }', lambda x: (-x) ** -1.5, (-3, -0.5)),
    ('type: "Power" power_param { scale: 3 shift: -1 }', lambda x: 3 * x - 1, (-3, 3)),
    ('type: "Exp"', math.exp, (-2, 2)),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', lambda x: 2 ** (1 + 0.5 * x),
     (-2, 2)),
    ('type: "Log"', math.log, (0.1, 3)),
    ('type: "Log" log_param { base: 10 scale: 2 shift: 1 }', lambda x: math.log10(1 + 2 * x),
     (0.1, 3)),
    ('type: "Threshold" threshold_param { threshold: 0.25 }', lambda x: float(x > 0.25),
     (-1, 1)),
    ('type: "Clip" clip_param { min: -0.5 max: 1 }', lambda x: min(max(x, -0.5), 1.0),
     (-2, 2)),
    ('type: "Swish"', lambda x: x * sigmoid(x), (-4, 4)),
    ('type: "Swish" swish_param { beta: 2.5 }', lambda x: x * sigmoid(2.5 * x), (-4, 4)),
]
ALL = [text for text, _, _ in ELEMENTWISE] + [
    'type: "PReLU"',
    'type: "PReLU" prelu_param { channel_shared: true }',
]
IN_PLACE = [text for text in ALL if "AbsVal" not in text]
LIMITS = {text: limits for text, _, limits in ELEMENTWISE}


run = run_forward_backward


def inputs(low: float, high: float, shape=(2, 3, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape)


@pytest.mark.parametrize("text", ALL)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_and_dtype(text, dtype):
    low, high = LIMITS.get(text, (-1, 1))
    bottom = random_blob((2, 3, 4, 5), dtype=dtype, low=low, high=high)
    layer, top = make_layer(text, [bottom], dtype=dtype)
    layer.forward([bottom], top)
    assert top[0].shape == (2, 3, 4, 5)
    assert top[0].data.dtype == dtype
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    assert bottom.diff.dtype == dtype


@pytest.mark.parametrize("text, reference, limits", ELEMENTWISE)
def test_forward_matches_per_element_reference(text, reference, limits):
    x = inputs(*limits)
    y, _ = run(text, x, np.ones_like(x), in_place=False)
    expected = np.array([reference(float(v)) for v in x.ravel()]).reshape(x.shape)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("text, reference, limits", ELEMENTWISE)
def test_gradient(text, reference, limits):
    if "Threshold" in text:
        pytest.skip("a step function: its gradient is zero, tested below")
    low, high = limits
    bottom = random_blob((2, 3, 2, 2), seed=1, low=low, high=high)
    if "Clip" in text:  # keep clear of the two kinks
        bottom.data[np.abs(bottom.data + 0.5) < 0.01] += 0.05
        bottom.data[np.abs(bottom.data - 1) < 0.01] += 0.05
    layer, top = make_layer(text, [bottom])
    check_gradient(layer, [bottom], top, kink=0.0, kink_range=0.01)


@pytest.mark.parametrize("text", IN_PLACE)
def test_in_place_matches_out_of_place(text):
    x = inputs(0.1, 2, (3, 4, 5)) * np.where(inputs(0, 1, (3, 4, 5), seed=9) > 0.5, 1, -1)
    if "Log" in text or "Power" in text:
        x = np.abs(x) * (-1 if "scale: -1" in text else 1)
    dy = np.random.default_rng(4).standard_normal(x.shape)
    y_out, dx_out = run(text, x, dy, in_place=False)
    y_in, dx_in = run(text, x, dy, in_place=True)
    np.testing.assert_array_equal(y_in, y_out)
    np.testing.assert_array_equal(dx_in, dx_out)


def test_absval_refuses_in_place():
    bottom = random_blob((2, 3))
    layer = create_layer(layer_param('type: "AbsVal"'), TRAIN, np.random.default_rng(0),
                         np.float64)
    with pytest.raises(LayerError, match="in-place"):
        layer.setup([bottom], [bottom])
        layer.reshape([bottom], [bottom])


def test_absval_gradient_at_zero_is_zero():
    _, dx = run('type: "AbsVal"', np.array([-2.0, 0.0, 3.0]), np.ones(3), in_place=False)
    np.testing.assert_array_equal(dx, [-1, 0, 1])


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_forward_and_slope_shape(shared):
    text = f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}'
    x = inputs(-2, 2, (2, 3, 2, 2))
    bottom = blob_of(x)
    layer, top = make_layer(text, [bottom])
    assert layer.blobs[0].shape == (() if shared else (3,))
    np.testing.assert_array_equal(layer.blobs[0].data, 0.25)  # the default filler
    slopes = np.array([0.1, -0.5, 2.0])
    layer.blobs[0].data[...] = slopes[0] if shared else slopes
    layer.forward([bottom], top)
    expected = np.empty_like(x)
    for n, c, h, w in np.ndindex(x.shape):
        a = slopes[0] if shared else slopes[c]
        v = x[n, c, h, w]
        expected[n, c, h, w] = max(v, 0) + a * min(v, 0)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-15)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_gradient_on_bottom_and_slope(shared):
    text = (f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} '
            'filler { type: "uniform" min: -0.5 max: 0.5 } }')
    bottom = random_blob((2, 3, 2, 2), seed=2, low=-2, high=2)
    layer, top = make_layer(text, [bottom], seed=3)
    assert np.unique(layer.blobs[0].data).size == (1 if shared else 3)
    checked = check_gradient(layer, [bottom], top, kink=0.0, kink_range=0.01)
    assert checked > bottom.count


def test_prelu_slope_gradient_by_hand_and_accumulates():
    x = np.array([[[-1.0, 2.0]], [[-3.0, 0.0]]]).reshape(2, 1, 2)  # N=2, C=1
    bottom = blob_of(x)
    layer, top = make_layer('type: "PReLU"', [bottom])
    layer.forward([bottom], top)
    top[0].diff[...] = [[[1.0, 1.0]], [[2.0, 5.0]]]
    layer.blobs[0].diff[...] = 10
    layer.backward(top, [True], [bottom])
    # dL/da = sum over x <= 0 of dy * x = 1*(-1) + 2*(-3) + 5*0; accumulated onto 10
    np.testing.assert_allclose(layer.blobs[0].diff, [10 - 7])
    np.testing.assert_allclose(bottom.diff.ravel(), [0.25, 1, 0.5, 1.25])


def test_prelu_respects_param_propagate_down():
    bottom = random_blob((2, 3, 2), low=-1, high=1)
    layer, top = make_layer('type: "PReLU"', [bottom])
    layer.param_propagate_down = [False]
    layer.forward([bottom], top)
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    np.testing.assert_array_equal(layer.blobs[0].diff, 0)


def test_prelu_needs_two_axes_and_matching_channels():
    with pytest.raises(LayerError, match="at least 2 axes"):
        make_layer('type: "PReLU"', [random_blob((4,))])
    layer, top = make_layer('type: "PReLU"', [random_blob((2, 3))])
    with pytest.raises(LayerError, match="4 channels"):
        layer.reshape([random_blob((2, 4))], top)


@pytest.mark.parametrize("text, value", [
    ('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', 1.0),
    ('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', 8.0),
])
def test_power_constant_cases_have_zero_gradient(text, value):
    x = inputs(-1, 1)
    y, dx = run(text, x, np.ones_like(x), in_place=False)
    np.testing.assert_array_equal(y, value)
    np.testing.assert_array_equal(dx, 0)


def test_bnll_is_stable_for_large_inputs():
    x = np.array([-800.0, -40.0, 0.0, 40.0, 800.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, dx = run('type: "BNLL"', x, np.ones_like(x), in_place=True)
    np.testing.assert_allclose(y, [0.0, math.exp(-40), math.log(2), 40.0, 800.0], rtol=1e-14)
    np.testing.assert_allclose(dx, [0.0, math.exp(-40), 0.5, 1.0, 1.0], rtol=1e-14)


def test_threshold_backward_writes_zeros():
    x = np.array([-1.0, 0.25, 0.3])
    y, dx = run('type: "Threshold" threshold_param { threshold: 0.25 }', x, np.ones(3), False)
    np.testing.assert_array_equal(y, [0, 0, 1])  # strictly greater
    np.testing.assert_array_equal(dx, 0)


@pytest.mark.parametrize("in_place", [False, True])
def test_clip_gradient_includes_both_ends(in_place):
    x = np.array([-2.0, -0.5, 0.0, 1.0, 1.5])
    y, dx = run('type: "Clip" clip_param { min: -0.5 max: 1 }', x, np.full(5, 3.0), in_place)
    np.testing.assert_array_equal(y, [-0.5, -0.5, 0, 1, 1])
    np.testing.assert_array_equal(dx, [0, 3, 3, 3, 0])


@pytest.mark.parametrize("text, match", [
    ('type: "Clip" clip_param { min: 0 }', "missing max"),
    ('type: "Clip"', "missing min, max"),
    ('type: "Exp" exp_param { base: 0 }', "strictly positive"),
    ('type: "Log" log_param { base: -2 }', "strictly positive"),
])
def test_bad_parameters_are_clear_errors(text, match):
    with pytest.raises(LayerError, match=match):
        make_layer(text, [random_blob((2, 2))])


def test_float32_forward_stays_float32_and_close():
    for text, reference, limits in ELEMENTWISE:
        x = inputs(*limits, (4, 5)).astype(np.float32)
        y, _ = run(text, x, np.ones_like(x), in_place=False, dtype=np.float32)
        assert y.dtype == np.float32
        expected = np.array([reference(float(v)) for v in x.ravel()]).reshape(x.shape)
        np.testing.assert_allclose(y, expected, rtol=2e-6, atol=1e-6, err_msg=text)
