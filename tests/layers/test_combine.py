"""Concat and Eltwise: shapes, values, views, gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, in_place_layer, make_layer, random_blob

from engine.errors import LayerError


# -- Concat ----------------------------------------------------------------------------------
@pytest.mark.parametrize("param, shapes, axis, top_shape", [
    ("", [(2, 3, 2), (2, 1, 2), (2, 4, 2)], 1, (2, 8, 2)),
    ("concat_param { axis: 0 }", [(2, 3), (1, 3)], 0, (3, 3)),
    ("concat_param { axis: -1 }", [(2, 3), (2, 2)], 1, (2, 5)),
    ("concat_param { concat_dim: 0 }", [(1, 2, 2), (3, 2, 2)], 0, (4, 2, 2)),
])
def test_concat_forward_backward(param, shapes, axis, top_shape):
    bottom = [random_blob(s, seed=i) for i, s in enumerate(shapes)]
    layer, top = make_layer(f'type: "Concat" {param}', bottom)
    layer.forward(bottom, top)
    assert top[0].shape == top_shape
    np.testing.assert_array_equal(top[0].data, np.concatenate([b.data for b in bottom], axis))
    top[0].diff[...] = np.arange(top[0].count, dtype=float).reshape(top_shape)
    layer.backward(top, [True] * len(bottom), bottom)
    pieces = np.split(top[0].diff, np.cumsum([s[axis] for s in shapes])[:-1], axis)
    for b, piece in zip(bottom, pieces, strict=True):
        np.testing.assert_array_equal(b.diff, piece)


@pytest.mark.parametrize("param", ["concat_param { axis: 0 }", "concat_param { axis: 1 }"])
def test_concat_gradient(param):
    bottom = [random_blob((2, 3), seed=1), random_blob((2, 3), seed=2)]
    layer, top = make_layer(f'type: "Concat" {param}', bottom)
    check_gradient(layer, bottom, top)


def test_concat_respects_propagate_down():
    bottom = [random_blob((2, 2)), random_blob((2, 3))]
    bottom[0].diff[...] = 7
    layer, top = make_layer('type: "Concat"', bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [False, True], bottom)
    assert np.all(bottom[0].diff == 7) and np.all(bottom[1].diff == 1)


def test_concat_single_bottom_is_a_view():
    bottom = random_blob((2, 3))
    layer, top = make_layer('type: "Concat"', [bottom])
    layer.forward([bottom], top)
    assert np.shares_memory(top[0].data, bottom.data)
    np.testing.assert_array_equal(top[0].data, bottom.data)
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize("param, shapes, match", [
    ("", [(2, 3, 4), (2, 3, 5)], r"except along axis 1.*\(2, 3, 4\).*\(2, 3, 5\)"),
    ("", [(2, 3, 4), (2, 3)], r"\(2, 3, 4\).*\(2, 3\)"),
    ("concat_param { axis: 1 concat_dim: 1 }", [(2, 3), (2, 3)], "not both"),
    ("concat_param { concat_dim: 2 }", [(2, 3), (2, 3)], "concat_dim 2"),
    ("concat_param { axis: 2 }", [(2, 3), (2, 3)], "axis"),
])
def test_concat_errors(param, shapes, match):
    with pytest.raises(LayerError, match=match):
        make_layer(f'type: "Concat" {param}', [random_blob(s) for s in shapes])


# -- Eltwise ---------------------------------------------------------------------------------
A = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
B = np.array([[2.0, 2.0, -1.0], [0.5, -3.0, 2.0]])
C = np.array([[-1.0, 0.5, 5.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("param, expected", [
    ("", A + B + C),
    ("eltwise_param { operation: SUM coeff: 1 coeff: -2 coeff: 0.5 }", A - 2 * B + 0.5 * C),
    ("eltwise_param { operation: PROD }", A * B * C),
    ("eltwise_param { operation: MAX }", [[2, 2, 5], [1, 4, 2]]),
])
def test_eltwise_forward(param, expected):
    bottom = [blob_of(A), blob_of(B), blob_of(C)]
    layer, top = make_layer(f'type: "Eltwise" {param}', bottom)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-15)


@pytest.mark.parametrize("param, grads", [
    ("eltwise_param { coeff: 1 coeff: -2 coeff: 0.5 }", [1, -2, 0.5]),
    ("eltwise_param { operation: PROD }", [B * C, A * C, A * B]),
    ("eltwise_param { operation: PROD stable_prod_grad: false }", [B * C, A * C, A * B]),
    ("eltwise_param { operation: MAX }",
     [[[0, 0, 0], [0, 1, 0]], [[1, 1, 0], [0, 0, 1]], [[0, 0, 1], [1, 0, 0]]]),
])
def test_eltwise_backward(param, grads):
    bottom = [blob_of(A), blob_of(B), blob_of(C)]
    layer, top = make_layer(f'type: "Eltwise" {param}', bottom)
    layer.forward(bottom, top)
    dy = np.random.default_rng(0).standard_normal(A.shape)
    top[0].diff[...] = dy
    layer.backward(top, [True] * 3, bottom)
    for b, g in zip(bottom, grads, strict=True):
        np.testing.assert_allclose(b.diff, dy * np.asarray(g), rtol=1e-12)


def test_eltwise_max_ties_follow_caffe():
    # Caffe's CPU loop: bottom 0 beats bottom 1 only if strictly greater; a later bottom
    # must be strictly greater than the running max
    ones = np.ones((1, 3))
    bottom = [blob_of(ones), blob_of(ones), blob_of(ones)]
    layer, top = make_layer('type: "Eltwise" eltwise_param { operation: MAX }', bottom)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True] * 3, bottom)
    assert [b.diff.sum() for b in bottom] == [0, 3, 0]


@pytest.mark.parametrize("param", [
    "",
    "eltwise_param { coeff: 0.5 coeff: -1.5 }",
    "eltwise_param { operation: PROD }",
    "eltwise_param { operation: PROD stable_prod_grad: false }",
    "eltwise_param { operation: MAX }",
])
def test_eltwise_gradient(param):
    bottom = [random_blob((2, 3, 2), seed=s, low=0.5, high=2) for s in (1, 2)]
    bottom[1].data *= np.sign(np.random.default_rng(9).standard_normal((2, 3, 2)))
    layer, top = make_layer(f'type: "Eltwise" {param}', bottom)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("param", ["", "eltwise_param { operation: MAX }",
                                   "eltwise_param { coeff: 2 coeff: -1 }"])
def test_eltwise_in_place_matches_out_of_place(param):
    dy = np.random.default_rng(0).standard_normal(A.shape)
    results = []
    for in_place in (False, True):
        bottom = [blob_of(A), blob_of(B)]
        text = f'type: "Eltwise" {param}'
        layer, top = in_place_layer(text, bottom) if in_place else make_layer(text, bottom)
        layer.forward(bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = dy
        layer.backward(top, [True, True], bottom)
        results.append((y, bottom[0].diff.copy(), bottom[1].diff.copy()))
    for out_place, in_place in zip(*results, strict=True):
        np.testing.assert_array_equal(in_place, out_place)


@pytest.mark.parametrize("param, shapes, match", [
    ("eltwise_param { coeff: 1 }", [(2, 3), (2, 3)], "one coefficient per bottom"),
    ("eltwise_param { operation: PROD coeff: 1 coeff: 1 }", [(2, 3), (2, 3)], "only allowed"),
    ("", [(2, 3), (3, 2)], r"bottom 0 is \(2, 3\), bottom 1 is \(3, 2\)"),
    ("", [(2, 3)], "bottom"),
])
def test_eltwise_errors(param, shapes, match):
    with pytest.raises(LayerError, match=match):
        make_layer(f'type: "Eltwise" {param}', [random_blob(s) for s in shapes])


def test_eltwise_prod_in_place_is_an_error():
    with pytest.raises(LayerError, match="in-place"):
        in_place_layer('type: "Eltwise" eltwise_param { operation: PROD }',
                       [random_blob((2, 3)), random_blob((2, 3))])
