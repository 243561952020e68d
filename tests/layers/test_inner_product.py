"""InnerProduct: shapes for axis/transpose/bias, forward against loops, gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine.errors import LayerError

GAUSS = 'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'


def ip(extra: str = "", num_output: int = 3) -> str:
    return (f'type: "InnerProduct" inner_product_param {{ num_output: {num_output} '
            f'{GAUSS} {extra} }}')


def naive(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, axis: int,
          transpose: bool) -> np.ndarray:
    """y[m, n] = sum_k x[m, k] W[n, k] + b[n], with explicit loops."""
    lead = x.shape[:axis]
    x2 = x.reshape(int(np.prod(lead)), -1)
    w_nk = w.T if transpose else w
    y = np.zeros((x2.shape[0], w_nk.shape[0]))
    for m in range(x2.shape[0]):
        for n in range(w_nk.shape[0]):
            for k in range(x2.shape[1]):
                y[m, n] += x2[m, k] * w_nk[n, k]
            if b is not None:
                y[m, n] += b[n]
    return y.reshape(*lead, -1)


@pytest.mark.parametrize("extra, top_shape, param_shapes", [
    ("", (2, 3), [(3, 60), (3,)]),
    ("axis: 2", (2, 3, 3), [(3, 20), (3,)]),
    ("axis: -1", (2, 3, 4, 3), [(3, 5), (3,)]),
    ("axis: 0", (3,), [(3, 120), (3,)]),
    ("transpose: true", (2, 3), [(60, 3), (3,)]),
    ("axis: 2 transpose: true bias_term: false", (2, 3, 3), [(20, 3)]),
])
def test_shapes(extra, top_shape, param_shapes):
    layer, top = make_layer(ip(extra), [random_blob((2, 3, 4, 5))])
    assert top[0].shape == top_shape
    assert [b.shape for b in layer.blobs] == param_shapes


def test_forward_hand_computed():
    bottom = blob_of([[1.0, 2.0], [3.0, 4.0]])
    layer, top = make_layer('type: "InnerProduct" inner_product_param { num_output: 3 }',
                            [bottom])
    layer.blobs[0].data[...] = [[1, 0], [0, 1], [1, 1]]
    layer.blobs[1].data[...] = [0.5, -1, 2]
    layer.forward([bottom], top)
    np.testing.assert_array_equal(top[0].data, [[1.5, 1, 5], [3.5, 3, 9]])


@pytest.mark.parametrize("extra, shape", [
    ("", (2, 3, 2, 2)),
    ("axis: 2", (2, 3, 4)),
    ("transpose: true", (2, 3, 2)),
    ("axis: 2 transpose: true", (2, 2, 3)),
    ("bias_term: false", (4, 5)),
])
def test_forward_matches_loops(extra, shape):
    bottom = random_blob(shape, seed=2)
    layer, top = make_layer(ip(extra), [bottom])
    layer.forward([bottom], top)
    axis = 2 if "axis: 2" in extra else 1
    bias = layer.blobs[1].data if len(layer.blobs) > 1 else None
    expected = naive(bottom.data, layer.blobs[0].data, bias, axis, "transpose" in extra)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("extra, shape", [
    ("", (2, 3, 2)),
    ("axis: 2", (2, 2, 3)),
    ("transpose: true", (2, 4)),
    ("axis: -1 transpose: true", (2, 2, 3)),
    ("bias_term: false", (3, 2)),
])
def test_gradient(extra, shape):
    bottom = random_blob(shape, seed=3)
    layer, top = make_layer(ip(extra), [bottom])
    check_gradient(layer, [bottom], top)


def test_transpose_equals_untransposed_weights():
    bottom = random_blob((4, 6), seed=4)
    plain, top_plain = make_layer(ip(), [bottom])
    trans, top_trans = make_layer(ip("transpose: true"), [bottom])
    trans.blobs[0].data[...] = plain.blobs[0].data.T
    trans.blobs[1].data[...] = plain.blobs[1].data
    for layer, top in ((plain, top_plain), (trans, top_trans)):
        layer.forward([bottom], top)
        top[0].diff[...] = 1
        layer.backward(top, [True], [bottom])
    np.testing.assert_allclose(top_trans[0].data, top_plain[0].data, rtol=1e-14)
    np.testing.assert_allclose(trans.blobs[0].diff, plain.blobs[0].diff.T, rtol=1e-14)


def test_param_diffs_accumulate_bottom_diff_is_overwritten():
    bottom = random_blob((2, 5), seed=5)
    layer, top = make_layer(ip(), [bottom])
    layer.forward([bottom], top)
    top[0].diff[...] = np.random.default_rng(0).standard_normal(top[0].shape)
    layer.backward(top, [True], [bottom])
    once = [b.diff.copy() for b in layer.blobs] + [bottom.diff.copy()]
    layer.backward(top, [True], [bottom])
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once[0], rtol=1e-14)
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * once[1], rtol=1e-14)
    np.testing.assert_array_equal(bottom.diff, once[2])


def test_param_propagate_down_false_skips_that_param():
    bottom = random_blob((2, 5), seed=5)
    bottom.diff[...] = 9
    layer, top = make_layer(ip(), [bottom])
    layer.param_propagate_down = [False, True]
    layer.forward([bottom], top)
    top[0].diff[...] = 1
    layer.backward(top, [False], [bottom])
    assert not layer.blobs[0].diff.any()
    np.testing.assert_array_equal(layer.blobs[1].diff, [2, 2, 2])
    assert np.all(bottom.diff == 9)


def test_fillers_and_float32():
    text = ('type: "InnerProduct" inner_product_param { num_output: 2 '
            'weight_filler { type: "constant" value: 0.5 } '
            'bias_filler { type: "constant" value: -1 } }')
    bottom = random_blob((3, 4), dtype=np.float32)
    layer, top = make_layer(text, [bottom], dtype=np.float32)
    assert layer.blobs[0].data.dtype == np.float32
    assert np.all(layer.blobs[0].data == 0.5) and np.all(layer.blobs[1].data == -1)
    layer.forward([bottom], top)
    assert top[0].data.dtype == np.float32
    expected = np.repeat(0.5 * bottom.data.sum(1, keepdims=True) - 1, 2, axis=1)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-6)


def test_batch_change_is_fine_but_changed_k_is_an_error():
    layer, top = make_layer(ip(), [random_blob((2, 3, 4))])
    bigger_batch = random_blob((5, 3, 4))
    layer.reshape([bigger_batch], top)
    assert top[0].shape == (5, 3)
    with pytest.raises(LayerError, match=r"incompatible.*K = 15.*K = 12"):
        layer.reshape([random_blob((2, 3, 5))], top)


@pytest.mark.parametrize("text, match", [
    ('type: "InnerProduct" inner_product_param { }', "num_output"),
    ('type: "InnerProduct" inner_product_param { num_output: 2 axis: 3 }', "axis"),
])
def test_bad_params(text, match):
    with pytest.raises(LayerError, match=match):
        make_layer(text, [random_blob((2, 3))])
