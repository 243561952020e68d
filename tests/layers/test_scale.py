"""Scale and Bias: parameter shapes from axis/num_axes, forward against a naive loop, gradients
for bottoms, parameters and the second bottom, in-place backward, fillers and errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, layer_param, make_layer, random_blob

from engine.blob import Blob
from engine.errors import LayerError
from engine.layer import TRAIN, create_layer

SHAPE = (2, 3, 4, 5)

# (axis, num_axes, expected parameter shape for a (2, 3, 4, 5) bottom)
AXES = [
    (1, 1, (3,)),
    (1, 2, (3, 4)),
    (1, -1, (3, 4, 5)),
    (0, -1, (2, 3, 4, 5)),
    (0, 0, ()),
    (2, 0, ()),
    (-2, 1, (4,)),
    (2, 2, (4, 5)),
    (0, 1, (2,)),
]


def reference(x: np.ndarray, operand: np.ndarray, axis: int, op) -> np.ndarray:
    """op(x, operand) element by element, the operand indexed by x's axes from ``axis`` on."""
    axis = axis % x.ndim if operand.ndim else 0
    y = np.empty_like(x)
    for index in np.ndindex(x.shape):
        y[index] = op(x[index], operand[index[axis:axis + operand.ndim]])
    return y


def scale_text(axis: int, num_axes: int, extra: str = "") -> str:
    return f'type: "Scale" scale_param {{ axis: {axis} num_axes: {num_axes} {extra} }}'


def bias_text(axis: int, num_axes: int, extra: str = "") -> str:
    return f'type: "Bias" bias_param {{ axis: {axis} num_axes: {num_axes} {extra} }}'


UNIFORM = 'filler { type: "uniform" min: -2 max: 2 }'


@pytest.mark.parametrize("axis, num_axes, shape", AXES)
def test_scale_parameter_shape_and_forward(axis, num_axes, shape):
    bottom = random_blob(SHAPE, seed=1)
    layer, top = make_layer(scale_text(axis, num_axes, UNIFORM), [bottom])
    assert [b.shape for b in layer.blobs] == [shape]
    layer.forward([bottom], top)
    assert top[0].shape == SHAPE
    expected = reference(bottom.data, layer.blobs[0].data, axis, lambda a, b: a * b)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-15)


@pytest.mark.parametrize("axis, num_axes, shape", AXES)
def test_bias_parameter_shape_and_forward(axis, num_axes, shape):
    bottom = random_blob(SHAPE, seed=2)
    layer, top = make_layer(bias_text(axis, num_axes, UNIFORM), [bottom])
    assert [b.shape for b in layer.blobs] == [shape]
    layer.forward([bottom], top)
    expected = reference(bottom.data, layer.blobs[0].data, axis, lambda a, b: a + b)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-15)


def test_default_fillers_give_the_identity():
    bottom = random_blob(SHAPE, seed=3)
    for text in ('type: "Scale"', 'type: "Bias"', 'type: "Scale" scale_param { bias_term: true }'):
        layer, top = make_layer(text, [bottom])
        layer.forward([bottom], top)
        np.testing.assert_array_equal(top[0].data, bottom.data)
    scale, _ = make_layer('type: "Scale" scale_param { bias_term: true }', [bottom])
    np.testing.assert_array_equal(scale.blobs[0].data, 1)
    np.testing.assert_array_equal(scale.blobs[1].data, 0)


def test_scale_with_bias_term_by_hand():
    x = np.arange(6.0).reshape(1, 2, 3)
    bottom = blob_of(x)
    text = ('type: "Scale" scale_param { bias_term: true filler { type: "constant" value: 2 } '
            'bias_filler { type: "constant" value: -1 } }')
    layer, top = make_layer(text, [bottom])
    assert [b.shape for b in layer.blobs] == [(2,), (2,)]
    layer.forward([bottom], top)
    np.testing.assert_array_equal(top[0].data, 2 * x - 1)


@pytest.mark.parametrize("axis, num_axes, shape", AXES)
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_gradient_learned(axis, num_axes, shape, bias_term):
    bottom = random_blob((2, 3, 2, 2), seed=4)
    extra = f"{UNIFORM} bias_term: {str(bias_term).lower()} bias_{UNIFORM}"
    layer, top = make_layer(scale_text(axis, num_axes, extra), [bottom], seed=5)
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize("operand_shape, axis", [((3,), 1), ((3, 2), 1), ((), 1), ((2, 2), -2),
                                                 ((2, 3, 2, 2), 0)])
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_gradient_second_bottom(operand_shape, axis, bias_term):
    bottom = [random_blob((2, 3, 2, 2), seed=6), random_blob(operand_shape, seed=7)]
    text = f'type: "Scale" scale_param {{ axis: {axis} bias_term: {str(bias_term).lower()} ' \
           f'bias_{UNIFORM} }}'
    layer, top = make_layer(text, bottom, seed=8)
    assert [b.shape for b in layer.blobs] == ([operand_shape] if bias_term else [])
    layer.forward(bottom, top)
    expected = reference(bottom[0].data, bottom[1].data, axis, lambda a, b: a * b)
    if bias_term:
        expected = reference(expected, layer.blobs[0].data, axis, lambda a, b: a + b)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-14)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("axis, num_axes, shape", AXES)
def test_bias_gradient_learned(axis, num_axes, shape):
    bottom = random_blob((2, 3, 2, 2), seed=9)
    layer, top = make_layer(bias_text(axis, num_axes, UNIFORM), [bottom], seed=10)
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize("operand_shape, axis", [((3,), 1), ((2, 2), 2), ((), 3)])
def test_bias_gradient_second_bottom(operand_shape, axis):
    bottom = [random_blob((2, 3, 2, 2), seed=11), random_blob(operand_shape, seed=12)]
    layer, top = make_layer(f'type: "Bias" bias_param {{ axis: {axis} }}', bottom)
    assert layer.blobs == []
    layer.forward(bottom, top)
    expected = reference(bottom[0].data, bottom[1].data, axis, lambda a, b: a + b)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-15)
    check_gradient(layer, bottom, top)


def run_twice(text: str, n_bottom: int, in_place: bool):
    """Forward and backward; returns (top data, bottom diffs, parameter diffs)."""
    rng = np.random.default_rng(13)
    bottom = [blob_of(rng.standard_normal((2, 3, 4)))]
    if n_bottom == 2:
        bottom.append(blob_of(rng.standard_normal((3,))))
    layer = create_layer(layer_param(text), TRAIN, np.random.default_rng(14), np.float64)
    top = [bottom[0]] if in_place else [Blob((), np.float64)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    y = top[0].data.copy()
    top[0].diff[...] = np.random.default_rng(15).standard_normal(y.shape)
    for blob in layer.blobs:
        blob.diff[...] = 1  # parameter diffs accumulate onto this
    layer.backward(top, [True] * n_bottom, bottom)
    return y, [b.diff.copy() for b in bottom], [b.diff.copy() for b in layer.blobs]


@pytest.mark.parametrize("text, n_bottom", [
    (f'type: "Scale" scale_param {{ {UNIFORM} }}', 1),
    (f'type: "Scale" scale_param {{ {UNIFORM} bias_term: true bias_{UNIFORM} }}', 1),
    (f'type: "Scale" scale_param {{ bias_term: true bias_{UNIFORM} }}', 2),
    (f'type: "Bias" bias_param {{ {UNIFORM} }}', 1),
    ('type: "Bias"', 2),
])
def test_in_place_matches_out_of_place(text, n_bottom):
    y_out, bottom_out, params_out = run_twice(text, n_bottom, in_place=False)
    y_in, bottom_in, params_in = run_twice(text, n_bottom, in_place=True)
    np.testing.assert_array_equal(y_in, y_out)
    for a, b in zip(bottom_in + params_in, bottom_out + params_out, strict=True):
        np.testing.assert_array_equal(a, b)


def test_parameter_diffs_accumulate_and_second_bottom_diff_is_overwritten():
    x = np.arange(6.0).reshape(2, 3)
    dy = np.ones((2, 3))
    # learned scale: ds = sum over n of dy * x = [3, 5, 7], accumulated onto 1
    layer, top = make_layer('type: "Scale"', [blob_of(x)])
    layer.blobs[0].diff[...] = 1
    layer.forward([blob_of(x)], top)
    top[0].diff[...] = dy
    layer.backward(top, [False], [blob_of(x)])
    np.testing.assert_array_equal(layer.blobs[0].diff, [4, 6, 8])
    # scale as bottom 1: its diff is overwritten
    bottom = [blob_of(x), blob_of(np.ones(3))]
    bottom[1].diff[...] = 100
    layer, top = make_layer('type: "Scale"', bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True, True], bottom)
    np.testing.assert_array_equal(bottom[1].diff, [3, 5, 7])


def test_param_propagate_down_false_leaves_parameter_diffs():
    bottom = random_blob((2, 3))
    layer, top = make_layer('type: "Scale" scale_param { bias_term: true }', [bottom])
    layer.param_propagate_down = [False, False]
    layer.forward([bottom], top)
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    assert all(np.all(b.diff == 0) for b in layer.blobs)


@pytest.mark.parametrize("text, shapes, match", [
    ('type: "Scale" scale_param { axis: 2 num_axes: 3 }', [SHAPE], "extends past"),
    ('type: "Scale" scale_param { num_axes: -2 }', [SHAPE], "num_axes must be >= 0"),
    ('type: "Scale" scale_param { axis: 4 }', [SHAPE], "axis"),
    ('type: "Scale"', [SHAPE, (4,)], r"shape \(4,\) does not match"),
    ('type: "Bias" bias_param { axis: 2 }', [SHAPE, (4, 4)], "does not match"),
    ('type: "Bias" bias_param { num_axes: 5 }', [SHAPE], "extends past"),
])
def test_shape_errors(text, shapes, match):
    with pytest.raises(LayerError, match=match):
        make_layer(text, [random_blob(s) for s in shapes])


@pytest.mark.parametrize("text", ['type: "Scale" scale_param { bias_term: true }',
                                  'type: "Bias"'])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(text, dtype):
    bottom = random_blob(SHAPE, dtype=dtype)
    layer, top = make_layer(text, [bottom], dtype=dtype)
    layer.forward([bottom], top)
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    assert top[0].data.dtype == bottom.diff.dtype == dtype
    assert all(b.data.dtype == b.diff.dtype == dtype for b in layer.blobs)
