"""Silence, Reduction, ArgMax, Filter, BatchReindex, Parameter."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine.errors import LayerError


# -- Silence ---------------------------------------------------------------------------------
def test_silence_has_no_tops_and_zeroes_diffs():
    a, b = random_blob((2, 3)), random_blob((4,), seed=1)
    a.diff[...], b.diff[...] = 5, 5
    layer, top = make_layer('type: "Silence"', [a, b], n_top=0)
    layer.forward([a, b], top)
    layer.backward(top, [True, False], [a, b])
    assert np.all(a.diff == 0) and np.all(b.diff == 5)


# -- Reduction -------------------------------------------------------------------------------
def naive_reduction(x: np.ndarray, op: str, axis: int, coeff: float) -> np.ndarray:
    rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
    out = []
    for row in rows:
        f = {"SUM": row, "ASUM": np.abs(row), "SUMSQ": row**2, "MEAN": row / row.size}[op]
        out.append(coeff * sum(f))
    return np.array(out).reshape(x.shape[:axis])


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis, coeff", [(0, 1.0), (1, 2.0), (2, -0.5), (-1, 1.5)])
def test_reduction_forward_and_gradient(op, axis, coeff):
    bottom = random_blob((2, 3, 2), seed=3)
    text = f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }}'
    layer, top = make_layer(text, [bottom])
    assert top[0].shape == (2, 3, 2)[:axis % 3]
    layer.forward([bottom], top)
    np.testing.assert_allclose(top[0].data, naive_reduction(bottom.data, op, axis % 3, coeff))
    kink = 0.0 if op == "ASUM" else None
    check_gradient(layer, [bottom], top, kink=kink, kink_range=0.01)


def test_reduction_defaults_to_sum_over_everything_in_float32():
    bottom = blob_of([[1, -2], [3, 4]], np.float32)
    layer, top = make_layer('type: "Reduction"', [bottom], dtype=np.float32)
    layer.forward([bottom], top)
    assert top[0].shape == () and top[0].data.dtype == np.float32
    assert float(top[0].data) == 6.0


def test_reduction_bad_axis():
    with pytest.raises(LayerError, match="axis 3"):
        make_layer('type: "Reduction" reduction_param { axis: 3 }', [random_blob((2, 3))])


# -- ArgMax ----------------------------------------------------------------------------------
def naive_topk(row: np.ndarray, k: int) -> list[tuple[float, int]]:
    """Caffe's partial_sort of (value, index) pairs with std::greater."""
    return sorted(((float(v), j) for j, v in enumerate(row)), reverse=True)[:k]


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_without_axis(top_k, out_max_val):
    x = np.random.default_rng(0).integers(0, 4, (3, 2, 3)).astype(float)  # many ties
    bottom = blob_of(x)
    text = (f'type: "ArgMax" argmax_param {{ top_k: {top_k} '
            f'out_max_val: {str(out_max_val).lower()} }}')
    layer, top = make_layer(text, [bottom])
    assert top[0].shape == (3, 2 if out_max_val else 1, top_k)
    layer.forward([bottom], top)
    for n in range(3):
        pairs = naive_topk(x[n].ravel(), top_k)
        np.testing.assert_array_equal(top[0].data[n, 0], [j for _, j in pairs])
        if out_max_val:
            np.testing.assert_array_equal(top[0].data[n, 1], [v for v, _ in pairs])


def test_argmax_ties_go_to_the_higher_index():
    bottom = blob_of([[1.0, 5.0, 5.0, 2.0, 5.0]])
    layer, top = make_layer('type: "ArgMax" argmax_param { top_k: 4 }', [bottom])
    layer.forward([bottom], top)
    np.testing.assert_array_equal(top[0].data.ravel(), [4, 2, 1, 3])


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_with_axis(axis, out_max_val):
    x = np.random.default_rng(1).integers(0, 3, (2, 4, 3)).astype(float)
    bottom = blob_of(x)
    text = (f'type: "ArgMax" argmax_param {{ axis: {axis} top_k: 2 '
            f'out_max_val: {str(out_max_val).lower()} }}')
    layer, top = make_layer(text, [bottom])
    layer.forward([bottom], top)
    moved = np.moveaxis(x, axis, -1)
    expected = np.empty((*moved.shape[:-1], 2))
    for pos in np.ndindex(*moved.shape[:-1]):
        pairs = naive_topk(moved[pos], 2)
        expected[pos] = [v if out_max_val else j for v, j in pairs]
    np.testing.assert_array_equal(top[0].data, np.moveaxis(expected, -1, axis))


def test_argmax_pads_the_top_to_the_bottom_axes():
    bottom = random_blob((2, 3, 2, 2))
    _layer, top = make_layer('type: "ArgMax"', [bottom])
    assert top[0].shape == (2, 1, 1, 1)


@pytest.mark.parametrize("text, match", [
    ('argmax_param { top_k: 7 }', r"top_k \(7\).*\(6\)"),
    ('argmax_param { top_k: 4 axis: 1 }', r"top_k \(4\).*axis 1 \(3\)"),
    ('argmax_param { top_k: 0 }', "at least 1"),
    ('argmax_param { axis: 3 }', "axis 3"),
])
def test_argmax_errors(text, match):
    with pytest.raises(LayerError, match=match):
        make_layer(f'type: "ArgMax" {text}', [random_blob((2, 3, 2))])


def test_argmax_has_no_gradient():
    bottom = random_blob((2, 3))
    layer, top = make_layer('type: "ArgMax"', [bottom])
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="no gradient"):
        layer.backward(top, [True], [bottom])


# -- Filter ----------------------------------------------------------------------------------
def test_filter_forward_backward():
    a, b = random_blob((4, 3), seed=1), random_blob((4, 2, 2), seed=2)
    selector = blob_of([[0.0], [1.0], [0.0], [2.5]])
    layer, top = make_layer('type: "Filter"', [a, b, selector], n_top=2)
    assert [t.shape for t in top] == [(4, 3), (4, 2, 2)]  # first reshape: all items
    layer.reshape([a, b, selector], top)
    assert [t.shape for t in top] == [(2, 3), (2, 2, 2)]
    layer.forward([a, b, selector], top)
    np.testing.assert_array_equal(top[0].data, a.data[[1, 3]])
    np.testing.assert_array_equal(top[1].data, b.data[[1, 3]])
    top[0].diff[...] = [[1, 2, 3], [4, 5, 6]]
    layer.backward(top, [True, False, False], [a, b, selector])
    np.testing.assert_array_equal(a.diff, [[0, 0, 0], [1, 2, 3], [0, 0, 0], [4, 5, 6]])
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(0)


def test_filter_gradient():
    a, selector = random_blob((4, 3), seed=1), blob_of([1.0, 0.0, 1.0, 1.0])
    layer, top = make_layer('type: "Filter"', [a, selector])
    assert check_gradient(layer, [a, selector], top, check_bottom=[0]) == 12


@pytest.mark.parametrize("shapes, n_top, match", [
    ([(4, 3), (4,)], 2, "one top per filtered bottom"),
    ([(4, 3), (4, 2)], 1, "selector"),
    ([(3, 3), (4,)], 1, "selector's 4 items"),
])
def test_filter_errors(shapes, n_top, match):
    with pytest.raises(LayerError, match=match):
        make_layer('type: "Filter"', [random_blob(s) for s in shapes], n_top=n_top)


def test_filter_no_gradient_to_the_selector():
    a, selector = random_blob((2, 3)), blob_of([1.0, 0.0])
    layer, top = make_layer('type: "Filter"', [a, selector])
    with pytest.raises(LayerError, match="selector"):
        layer.backward(top, [True, True], [a, selector])


# -- BatchReindex ----------------------------------------------------------------------------
def test_batch_reindex_forward_and_accumulating_backward():
    x, idx = random_blob((3, 2)), blob_of([2.0, 0.0, 2.0, 2.0])
    layer, top = make_layer('type: "BatchReindex"', [x, idx])
    assert top[0].shape == (4, 2)
    layer.forward([x, idx], top)
    np.testing.assert_array_equal(top[0].data, x.data[[2, 0, 2, 2]])
    top[0].diff[...] = [[1, 1], [2, 2], [3, 3], [4, 4]]
    layer.backward(top, [True, False], [x, idx])
    np.testing.assert_array_equal(x.diff, [[2, 2], [0, 0], [8, 8]])


def test_batch_reindex_gradient():
    x, idx = random_blob((3, 2, 2)), blob_of([1.0, 1.0, 0.0])
    layer, top = make_layer('type: "BatchReindex"', [x, idx])
    assert check_gradient(layer, [x, idx], top, check_bottom=[0]) == 12


def test_batch_reindex_errors():
    x = random_blob((3, 2))
    layer, top = make_layer('type: "BatchReindex"', [x, blob_of([0.0, 3.0])])
    with pytest.raises(LayerError, match=r"index 3 at position 1 .*\[0, 3\)"):
        layer.forward([x, blob_of([0.0, 3.0])], top)
    with pytest.raises(LayerError, match="1-d"):
        make_layer('type: "BatchReindex"', [x, random_blob((2, 1))])
    assert not layer.allow_force_backward(1)


# -- Parameter -------------------------------------------------------------------------------
def test_parameter_exposes_its_blob_and_accumulates_diff():
    layer, top = make_layer('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [])
    assert top[0].shape == (2, 3) and layer.blobs[0].shape == (2, 3)
    layer.blobs[0].data[...] = np.arange(6).reshape(2, 3)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, layer.blobs[0].data)
    layer.blobs[0].diff[...] = 1
    top[0].diff[...] = 2
    layer.backward(top, [], [])
    np.testing.assert_array_equal(layer.blobs[0].diff, np.full((2, 3), 3.0))
    assert check_gradient(layer, [], top) == 6
    before = layer.blobs[0].diff.copy()
    layer.param_propagate_down = [False]
    layer.backward(top, [], [])
    np.testing.assert_array_equal(layer.blobs[0].diff, before)
