"""Pooling: shapes, forward and backward against Caffe's C++ loops written out, gradients,
errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine.errors import LayerError
from engine.layer import TEST, TRAIN
from engine.layers import pooling as pooling_module

FLT_MAX = float(np.finfo(np.float32).max)


def pool(params: str, bottom, n_top: int = 1, **kwargs):
    return make_layer(f'type: "Pooling" pooling_param {{ {params} }}', [bottom], n_top=n_top,
                      **kwargs)


def caffe_out(size, k, p, s, ceil=True):
    out = (math.ceil if ceil else math.floor)((size + 2 * p - k) / s) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


def caffe_windows(shape, k, s, p, ceil=True):
    """(n, c, ph, pw, hstart, hend, wstart, wend, pool_size) in Caffe's loop order."""
    n, c, h, w = shape
    for ni in range(n):
        for ci in range(c):
            for ph in range(caffe_out(h, k[0], p[0], s[0], ceil)):
                for pw in range(caffe_out(w, k[1], p[1], s[1], ceil)):
                    hs, ws = ph * s[0] - p[0], pw * s[1] - p[1]
                    he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
                    size = (he - hs) * (we - ws)
                    yield (ni, ci, ph, pw, max(hs, 0), min(he, h), max(ws, 0), min(we, w), size)


def caffe_max(x, k, s, p, ceil=True):
    """pooling_layer.cpp, MAX: from -FLT_MAX, strict > over the clipped window."""
    n, c, h, w = x.shape
    out = (n, c, caffe_out(h, k[0], p[0], s[0], ceil), caffe_out(w, k[1], p[1], s[1], ceil))
    top, mask = np.full(out, -FLT_MAX), np.full(out, -1.0)
    # min(hstart + k, H) as in the MAX loop equals the AVE window's end after its clipping
    for ni, ci, ph, pw, hs, he, ws, we, _ in caffe_windows(x.shape, k, s, p, ceil):
        for hh in range(hs, he):
            for ww in range(ws, we):
                if x[ni, ci, hh, ww] > top[ni, ci, ph, pw]:
                    top[ni, ci, ph, pw] = x[ni, ci, hh, ww]
                    mask[ni, ci, ph, pw] = hh * w + ww
    return top, mask


def caffe_max_backward(dtop, mask, shape):
    dx = np.zeros(shape)
    for ni, ci, ph, pw in np.ndindex(*dtop.shape):
        index = int(mask[ni, ci, ph, pw])
        if index >= 0:
            dx[ni, ci].flat[index] += dtop[ni, ci, ph, pw]
    return dx


def caffe_ave(x, k, s, p, ceil=True):
    """pooling_layer.cpp, AVE: in-image sum over a divisor that counts padding."""
    n, c, h, w = x.shape
    top = np.zeros((n, c, caffe_out(h, k[0], p[0], s[0], ceil),
                    caffe_out(w, k[1], p[1], s[1], ceil)))
    for ni, ci, ph, pw, hs, he, ws, we, size in caffe_windows(x.shape, k, s, p, ceil):
        top[ni, ci, ph, pw] = x[ni, ci, hs:he, ws:we].sum() / size
    return top


def caffe_ave_backward(dtop, shape, k, s, p, ceil=True):
    dx = np.zeros(shape)
    for ni, ci, ph, pw, hs, he, ws, we, size in caffe_windows(shape, k, s, p, ceil):
        dx[ni, ci, hs:he, ws:we] += dtop[ni, ci, ph, pw] / size
    return dx


# (input H, W, pooling_param, kernel, stride, pad, ceil, expected PH, PW)
CASES = [
    (7, 6, "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True, (3, 3)),  # ceil overhang
    (7, 6, "kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1), True, (4, 4)),  # clip rule
    (7, 6, "kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 3), (2, 2), (0, 0), False, (3, 2)),
    (7, 6, "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True, (4, 4)),
    (7, 6, "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (3, 3), (2, 2), (1, 1), False,
     (4, 3)),
    (6, 8, "kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0), True, (3, 4)),
    (7, 6, "kernel_size: 3 stride: 1 pad: 1", (3, 3), (1, 1), (1, 1), True, (7, 6)),
    (7, 9, "kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 3 pad_h: 2 pad_w: 1", (3, 2),
     (1, 3), (2, 1), True, (9, 4)),
    (8, 7, "kernel_size: 2 stride: 3", (2, 2), (3, 3), (0, 0), True, (3, 3)),  # stride > kernel
    (5, 5, "kernel_size: 5", (5, 5), (1, 1), (0, 0), True, (1, 1)),
    (4, 5, "global_pooling: true", (4, 5), (1, 1), (0, 0), True, (1, 1)),
    # the forks' spelling (BVLC pull request 3057)
    (7, 6, "kernel_size: 3 stride: 2 ceil_mode: false", (3, 3), (2, 2), (0, 0), False, (3, 2)),
    (7, 6, "kernel_size: 3 stride: 2 pad: 1 ceil_mode: false", (3, 3), (2, 2), (1, 1), False,
     (4, 3)),
    (7, 6, "kernel_size: 3 stride: 2 ceil_mode: true", (3, 3), (2, 2), (0, 0), True, (3, 3)),
    (7, 6, "kernel_size: 3 stride: 2 ceil_mode: false round_mode: FLOOR", (3, 3), (2, 2),
     (0, 0), False, (3, 2)),
    # kernels far wider than the input, most of each window in the padding (MAX trims them)
    (3, 4, "kernel_size: 9 stride: 1 pad: 4", (9, 9), (1, 1), (4, 4), True, (3, 4)),
    (4, 3, "kernel_h: 11 kernel_w: 7 stride: 2 pad_h: 5 pad_w: 3", (11, 7), (2, 2), (5, 3),
     True, (3, 2)),
    (5, 5, "kernel_size: 12 stride: 3 pad: 6 ceil_mode: false", (12, 12), (3, 3), (6, 6), False,
     (2, 2)),
]
IDS = [c[2] for c in CASES]


@pytest.mark.parametrize(("h", "w", "params", "k", "s", "p", "ceil", "out"), CASES, ids=IDS)
def test_top_shape(h, w, params, k, s, p, ceil, out):
    assert (caffe_out(h, k[0], p[0], s[0], ceil), caffe_out(w, k[1], p[1], s[1], ceil)) == out
    _, top = pool(f"pool: MAX {params}", random_blob((2, 3, h, w)), n_top=2)
    assert top[0].shape == top[1].shape == (2, 3, *out)


@pytest.mark.parametrize(("h", "w", "params", "k", "s", "p", "ceil", "out"), CASES, ids=IDS)
def test_max_forward_mask_and_backward(h, w, params, k, s, p, ceil, out):
    x = random_blob((2, 3, h, w), seed=h * w)
    layer, top = pool(f"pool: MAX {params}", x, n_top=2)
    layer.forward([x], top)
    expected, mask = caffe_max(x.data, k, s, p, ceil)
    np.testing.assert_array_equal(top[0].data, expected)
    np.testing.assert_array_equal(top[1].data, mask)
    top[0].diff[...] = np.random.default_rng(1).standard_normal(top[0].shape)
    layer.backward(top, [True], [x])
    np.testing.assert_allclose(x.diff, caffe_max_backward(top[0].diff, mask, x.shape),
                               atol=1e-15)


@pytest.fixture(params=["gemm", "views"])
def ave_path(request, monkeypatch):
    """Run AVE tests through both paths: one GEMM (small planes) and summed shifted views."""
    if request.param == "views":
        monkeypatch.setattr(pooling_module, "AVE_GEMM_MAX_CELLS", 0)
    return request.param


@pytest.mark.parametrize(("h", "w", "params", "k", "s", "p", "ceil", "out"), CASES, ids=IDS)
def test_ave_forward_and_backward(h, w, params, k, s, p, ceil, out, ave_path):
    x = random_blob((2, 3, h, w), seed=h + w)
    layer, top = pool(f"pool: AVE {params}", x)
    layer.forward([x], top)
    np.testing.assert_allclose(top[0].data, caffe_ave(x.data, k, s, p, ceil), atol=1e-15)
    top[0].diff[...] = np.random.default_rng(2).standard_normal(top[0].shape)
    layer.backward(top, [True], [x])
    np.testing.assert_allclose(x.diff, caffe_ave_backward(top[0].diff, x.shape, k, s, p, ceil),
                               atol=1e-15)


def test_ave_divisor_counts_padding_not_overhang(ave_path):
    x = blob_of(np.ones((1, 1, 3, 3)))
    layer, top = pool("pool: AVE kernel_size: 2 stride: 2 pad: 1", x)
    layer.forward([x], top)
    # windows start at -1 and 1; each spans 2 (padding counted), none runs past H + pad = 4
    np.testing.assert_allclose(top[0].data[0, 0], [[1 / 4, 2 / 4], [2 / 4, 4 / 4]])
    layer, top = pool("pool: AVE kernel_size: 3 stride: 2", blob_of(np.ones((1, 1, 4, 4))))
    layer.forward([blob_of(np.ones((1, 1, 4, 4)))], top)
    # the second window (2..4) overhangs the 4x4 input by one cell: divisor 2*2, not 3*3
    np.testing.assert_allclose(top[0].data[0, 0], [[1, 1], [1, 1]])


def test_max_ties_go_to_the_first_maximum():
    x = blob_of(np.array([[[[1, 5, 5], [5, 2, 5], [0, 5, 1]]]], float))
    layer, top = pool("pool: MAX kernel_size: 2 stride: 1", x, n_top=2)
    layer.forward([x], top)
    np.testing.assert_array_equal(top[1].data[0, 0], [[1, 1], [3, 5]])
    top[0].diff[...] = 1
    layer.backward(top, [True], [x])
    np.testing.assert_array_equal(x.diff[0, 0], [[0, 2, 0], [1, 0, 1], [0, 0, 0]])


def test_max_ties_on_integer_input_match_caffe():
    x = blob_of(np.random.default_rng(5).integers(0, 3, (2, 3, 9, 8)))
    layer, top = pool("pool: MAX kernel_size: 3 stride: 2 pad: 1", x, n_top=2)
    layer.forward([x], top)
    expected, mask = caffe_max(x.data, (3, 3), (2, 2), (1, 1))
    np.testing.assert_array_equal(top[0].data, expected)
    np.testing.assert_array_equal(top[1].data, mask)
    top[0].diff[...] = np.arange(top[0].count).reshape(top[0].shape)
    layer.backward(top, [True], [x])
    np.testing.assert_array_equal(x.diff, caffe_max_backward(top[0].diff, mask, x.shape))


def test_max_window_without_cells_is_caffe_sentinel():
    x = random_blob((1, 2, 5, 5))
    layer, top = pool("pool: MAX kernel_size: 1 stride: 3", x, n_top=2)  # windows at 0, 3, 6
    layer.forward([x], top)
    expected, mask = caffe_max(x.data, (1, 1), (3, 3), (0, 0))
    np.testing.assert_array_equal(top[0].data, expected)
    np.testing.assert_array_equal(top[1].data, mask)
    assert top[0].data[0, 0, 2, 2] == -FLT_MAX and top[1].data[0, 0, 2, 2] == -1
    top[0].diff[...] = 1
    layer.backward(top, [True], [x])
    np.testing.assert_array_equal(x.diff, caffe_max_backward(top[0].diff, mask, x.shape))


@pytest.mark.parametrize("params", ["kernel_size: 3 stride: 2", "kernel_size: 2 stride: 2 pad: 1",
                                    "kernel_h: 2 kernel_w: 3 stride: 1 pad_h: 1 pad_w: 0",
                                    "global_pooling: true"])
def test_max_gradient(params):
    # distinct values far apart, so no perturbation changes which cell wins
    values = np.random.default_rng(3).permutation(2 * 2 * 5 * 6) * 0.1
    x = blob_of(values.reshape(2, 2, 5, 6))
    layer, top = pool(f"pool: MAX {params}", x)
    assert check_gradient(layer, [x], top, stepsize=1e-3) > 0


@pytest.mark.parametrize("params", [
    "kernel_size: 3 stride: 2", "kernel_size: 3 stride: 2 pad: 1",
    "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1", "global_pooling: true",
])
def test_ave_gradient(params, ave_path):
    x = random_blob((2, 2, 5, 6))
    layer, top = pool(f"pool: AVE {params}", x)
    assert check_gradient(layer, [x], top) > 0


def test_global_pooling_takes_the_bottom_size():
    x = random_blob((2, 3, 4, 5))
    layer, top = pool("pool: AVE global_pooling: true", x)
    layer.forward([x], top)
    np.testing.assert_allclose(top[0].data[..., 0, 0], x.data.mean(axis=(2, 3)))
    x.reshape((2, 3, 6, 3))
    layer.reshape([x], top)
    layer.forward([x], top)
    assert top[0].shape == (2, 3, 1, 1)
    np.testing.assert_allclose(top[0].data[..., 0, 0], x.data.mean(axis=(2, 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype):
    x = random_blob((2, 3, 7, 6), dtype=dtype)
    for method in ("MAX", "AVE"):
        layer, top = pool(f"pool: {method} kernel_size: 3 stride: 2", x, dtype=dtype)
        layer.forward([x], top)
        top[0].diff[...] = 1
        layer.backward(top, [True], [x])
        assert top[0].data.dtype == x.diff.dtype == dtype
        expected = (caffe_max(x.data, (3, 3), (2, 2), (0, 0))[0] if method == "MAX" else
                    caffe_ave(x.data, (3, 3), (2, 2), (0, 0)))
        np.testing.assert_allclose(top[0].data, expected, rtol=1e-6, atol=1e-6)


def test_stochastic_test_phase_is_activation_weighted_average():
    x = random_blob((2, 3, 7, 6), low=0.0, high=1.0)
    layer, top = pool("pool: STOCHASTIC kernel_size: 3 stride: 2", x, phase=TEST)
    layer.forward([x], top)
    expected = np.zeros(top[0].shape)
    for ni, ci, ph, pw, hs, he, ws, we, _ in caffe_windows(x.shape, (3, 3), (2, 2), (0, 0)):
        cells = x.data[ni, ci, hs:he, ws:we]
        expected[ni, ci, ph, pw] = (cells**2).sum() / (np.float32(1.1754944e-38) + cells.sum())
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)
    assert check_gradient(layer, [x], top) > 0


def test_stochastic_train_samples_by_activation():
    x = blob_of(np.tile([[1.0, 3.0]], (4000, 1)).reshape(1, 4000, 1, 2))
    layer, top = pool("pool: STOCHASTIC kernel_h: 1 kernel_w: 2 stride: 2", x, phase=TRAIN)
    layer.forward([x], top)
    picked = top[0].data.ravel()
    assert set(np.unique(picked)) <= {1.0, 3.0}
    assert abs(np.mean(picked == 3.0) - 0.75) < 0.03
    top[0].diff[...] = 1
    layer.backward(top, [True], [x])
    np.testing.assert_array_equal(x.diff[:, :, 0, 1], (picked == 3.0).reshape(1, -1))
    np.testing.assert_array_equal(x.diff.sum(axis=3), 1)


def test_stochastic_train_picks_cells_of_the_window_and_is_seeded():
    x = random_blob((2, 3, 7, 6), low=0.0, high=1.0)
    runs = []
    for _ in range(2):
        layer, top = pool("pool: STOCHASTIC kernel_size: 3 stride: 2", x, phase=TRAIN, seed=7)
        layer.forward([x], top)
        runs.append(top[0].data.copy())
        top[0].diff[...] = 1
        layer.backward(top, [True], [x])
        for ni, ci, ph, pw, hs, he, ws, we, _ in caffe_windows(x.shape, (3, 3), (2, 2), (0, 0)):
            assert runs[-1][ni, ci, ph, pw] in x.data[ni, ci, hs:he, ws:we]
        assert x.diff.sum() == top[0].count
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize(("params", "n_top", "message"), [
    ("pool: MAX", 1, "kernel_size"),
    ("pool: MAX kernel_h: 2", 1, "kernel_size"),
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", 1, "not both"),
    ("pool: MAX kernel_size: 0", 1, "positive"),
    ("pool: MAX kernel_size: 2 stride: 0", 1, "positive"),
    ("pool: MAX kernel_size: 2 pad: 2", 1, "smaller than the kernel"),
    ("pool: MAX kernel_size: 2 pad_h: 1", 1, "together"),
    ("pool: MAX kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", 1, "not both"),
    ("pool: STOCHASTIC kernel_size: 3 pad: 1", 1, "only for MAX and AVE"),
    ("pool: AVE kernel_size: 2", 2, "second top"),
    ("pool: MAX global_pooling: true kernel_size: 2", 1, "global_pooling"),
    ("pool: MAX global_pooling: true stride: 2", 1, "stride 1"),
    ("pool: MAX kernel_size: 9 round_mode: FLOOR", 1, "does not fit"),
])
def test_bad_parameters(params, n_top, message):
    with pytest.raises(LayerError, match=message):
        pool(params, random_blob((1, 2, 5, 5)), n_top=n_top)


def test_bottom_must_be_4d():
    with pytest.raises(LayerError, match="4 axes"):
        pool("pool: MAX kernel_size: 2", random_blob((2, 3, 5)))


def test_max_test_phase_backward_recovers_the_argmax():
    x = blob_of(np.random.default_rng(4).integers(0, 3, (2, 3, 7, 6)))
    layer, top = pool("pool: MAX kernel_size: 3 stride: 2 pad: 1", x, phase=TEST)
    layer.forward([x], top)
    expected, mask = caffe_max(x.data, (3, 3), (2, 2), (1, 1))
    np.testing.assert_array_equal(top[0].data, expected)
    top[0].diff[...] = np.arange(top[0].count).reshape(top[0].shape)
    layer.backward(top, [True], [x])
    np.testing.assert_array_equal(x.diff, caffe_max_backward(top[0].diff, mask, x.shape))


def test_ceil_mode_contradicting_round_mode_is_refused():
    with pytest.raises(LayerError, match="ceil_mode: false contradicts round_mode: CEIL"):
        pool("kernel_size: 3 stride: 2 ceil_mode: false round_mode: CEIL",
             random_blob((1, 1, 7, 6)))
