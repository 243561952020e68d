"""Upsample (SegNet/ENet max-unpooling, YOLOv3-port nearest) and Interp (DeepLab v2 / PSPNet
bilinear resize): shapes, forward against the forks' loops written out, gradients, errors,
and Interp against OpenCV's dnn implementation."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine.blob import Blob
from engine.errors import LayerError


# -- the forks' loops ------------------------------------------------------------------------
def segnet_upsample(x, mask, out_hw):
    """upsample_layer.cpp Forward_cpu: zero, then top[mask[i]] = x[i] per plane, in order."""
    n, c = x.shape[:2]
    top = np.zeros((n, c, *out_hw))
    for ni in range(n):
        for ci in range(c):
            for i in range(x[ni, ci].size):
                idx = int(mask[ni, ci].flat[i])
                if idx >= 0:
                    top[ni, ci].flat[idx] = x[ni, ci].flat[i]
    return top


def segnet_upsample_backward(dtop, mask):
    """upsample_layer.cpp Backward_cpu: bottom_diff[i] = top_diff[mask[i]]."""
    dx = np.zeros(mask.shape)
    for ni, ci in np.ndindex(*mask.shape[:2]):
        for i in range(mask[ni, ci].size):
            idx = int(mask[ni, ci].flat[i])
            if idx >= 0:
                dx[ni, ci].flat[i] = dtop[ni, ci].flat[idx]
    return dx


def deeplab_interp(x, pad_beg, out_hw):
    """caffe_cpu_interp2 (not packed), with the crop offset -pad_beg on both axes, in the
    fork's float32 coordinate arithmetic."""
    n, c = x.shape[:2]
    h1, w1 = out_hw[2], out_hw[3]  # effective (cropped) input size
    h2, w2 = out_hw[:2]
    off = -pad_beg
    top = np.zeros((n, c, h2, w2))
    rh = np.float32(h1 - 1) / np.float32(h2 - 1) if h2 > 1 else np.float32(0)
    rw = np.float32(w1 - 1) / np.float32(w2 - 1) if w2 > 1 else np.float32(0)
    for i in range(h2):
        hr = np.float32(rh * np.float32(i))
        hi = int(hr)
        hp = 1 if hi < h1 - 1 else 0
        l1 = float(np.float32(hr - np.float32(hi)))
        l0 = 1.0 - l1
        for j in range(w2):
            wr = np.float32(rw * np.float32(j))
            wi = int(wr)
            wp = 1 if wi < w1 - 1 else 0
            m1 = float(np.float32(wr - np.float32(wi)))
            m0 = 1.0 - m1
            p = x[:, :, off + hi:, off + wi:]
            top[:, :, i, j] = (l0 * (m0 * p[:, :, 0, 0] + m1 * p[:, :, 0, wp])
                               + l1 * (m0 * p[:, :, hp, 0] + m1 * p[:, :, hp, wp]))
    return top


def upsample(params: str, bottom, **kwargs):
    return make_layer(f'type: "Upsample" upsample_param {{ {params} }}', bottom, **kwargs)


def interp(params: str, bottom, **kwargs):
    return make_layer(f'type: "Interp" interp_param {{ {params} }}', [bottom], **kwargs)


def max_pool_with_mask(x: Blob, params: str = "pool: MAX kernel_size: 2 stride: 2"):
    """Moka's own Pooling layer, with the mask top, on ``x``."""
    layer, (pooled, mask) = make_layer(f'type: "Pooling" pooling_param {{ {params} }}', [x],
                                       n_top=2)
    layer.forward([x], [pooled, mask])
    return pooled, mask


# -- Upsample --------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "hw", "out"), [
    ("scale: 2", (3, 4), (6, 8)),
    ("scale_h: 2 scale_w: 3", (3, 4), (6, 12)),
    ("scale: 2 pad_out_h: true", (3, 4), (5, 8)),
    ("scale: 2 pad_out_w: true", (3, 4), (6, 7)),
    ("upsample_h: 7 upsample_w: 9", (3, 4), (7, 9)),
])
def test_upsample_shapes(params, hw, out):
    x, mask = random_blob((2, 3, *hw)), blob_of(np.zeros((2, 3, *hw)))
    _, (top,) = upsample(params, [x, mask])
    assert top.shape == (2, 3, *out)


@pytest.mark.parametrize(("hw", "pool", "params"), [
    ((6, 8), "pool: MAX kernel_size: 2 stride: 2", "scale: 2"),
    ((7, 9), "pool: MAX kernel_size: 2 stride: 2", "upsample_h: 7 upsample_w: 9"),  # ceil
    ((5, 8), "pool: MAX kernel_size: 2 stride: 2", "scale: 2 pad_out_h: true"),
    ((9, 9), "pool: MAX kernel_size: 3 stride: 3", "scale: 3"),
])
def test_max_pool_then_upsample_puts_each_max_back(hw, pool, params):
    """SegNet's pairing: MAX Pooling's mask top drives the Upsample; the output holds each
    window's maximum at its own position and zero elsewhere."""
    x = random_blob((2, 3, *hw), seed=1)
    pooled, mask = max_pool_with_mask(x, pool)
    layer, (top,) = upsample(params, [pooled, mask])
    layer.forward([pooled, mask], [top])
    assert top.shape == x.shape
    kept = top.data != 0
    np.testing.assert_array_equal(top.data[kept], x.data[kept])
    assert kept.reshape(*x.shape[:2], -1).sum(axis=2).min() == pooled.shape[2] * pooled.shape[3]
    # every kept cell is the maximum of its pooling window
    k = int(pool.split("kernel_size: ")[1].split()[0])
    for ni, ci, i, j in zip(*np.nonzero(kept), strict=True):
        window = x.data[ni, ci, i // k * k:i // k * k + k, j // k * k:j // k * k + k]
        assert x.data[ni, ci, i, j] == window.max()
    np.testing.assert_array_equal(top.data, segnet_upsample(pooled.data, mask.data, hw))


def test_upsample_backward_gathers_and_matches_the_fork():
    x = random_blob((2, 2, 6, 4), seed=2)
    pooled, mask = max_pool_with_mask(x)
    layer, (top,) = upsample("scale: 2", [pooled, mask])
    layer.forward([pooled, mask], [top])
    top.diff[...] = np.random.default_rng(3).standard_normal(top.shape)
    layer.backward([top], [True, False], [pooled, mask])
    np.testing.assert_array_equal(pooled.diff, segnet_upsample_backward(top.diff, mask.data))


def test_upsample_gradient_from_a_real_mask():
    x = random_blob((2, 3, 6, 6), seed=4)
    pooled, mask = max_pool_with_mask(x)
    layer, top = upsample("scale: 2", [pooled, mask])
    assert check_gradient(layer, [pooled, mask], top, check_bottom=[0]) == pooled.count


def test_upsample_overlapping_windows_last_write_wins_as_the_fork():
    """3x3 windows at stride 2 share cells: the fork's loop writes in order, so the last
    pooled value aimed at a cell stays."""
    x = random_blob((1, 2, 7, 7), seed=5)
    pooled, mask = max_pool_with_mask(x, "pool: MAX kernel_size: 3 stride: 2")
    assert len(np.unique(mask.data[0, 0])) < mask.data[0, 0].size  # repeats exist
    layer, (top,) = upsample("upsample_h: 7 upsample_w: 7", [pooled, mask])
    layer.forward([pooled, mask], [top])
    np.testing.assert_array_equal(top.data, segnet_upsample(pooled.data, mask.data, (7, 7)))


def test_upsample_skips_missing_cells_in_the_mask():
    x = blob_of(np.arange(4.0).reshape(1, 1, 2, 2) + 1)
    mask = blob_of([[[[0, -1], [5, 15]]]])
    layer, (top,) = upsample("scale: 2", [x, mask])
    layer.forward([x, mask], [top])
    expected = np.zeros(16)
    expected[[0, 5, 15]] = [1, 3, 4]
    np.testing.assert_array_equal(top.data.reshape(-1), expected)


def test_upsample_nearest_with_one_bottom():
    """YOLOv3 ports: one bottom, each cell repeated scale x scale times."""
    x = random_blob((2, 3, 2, 3), seed=6)
    layer, (top,) = upsample("scale: 2", [x])
    layer.forward([x], [top])
    assert top.shape == (2, 3, 4, 6)
    for i, j in np.ndindex(4, 6):
        np.testing.assert_array_equal(top.data[:, :, i, j], x.data[:, :, i // 2, j // 2])
    check_gradient(layer, [x], [top])


@pytest.mark.parametrize(("params", "bottoms", "match"), [
    ("scale: 1", 2, "scale must be > 1"),
    ("scale_h: 2", 2, "scale_h and scale_w together"),
    ("scale: 2 scale_h: 2 scale_w: 2", 2, "either scale or scale_h"),
    ("scale: 3 pad_out_h: true", 2, "pad_out_h needs scale_h 2"),
    ("upsample_h: 5", 2, "upsample_h and upsample_w together"),
    ("upsample_h: 1 upsample_w: 4", 2, "must be > 1"),
    ("upsample_h: 6 upsample_w: 6", 1, "need the mask bottom"),
])
def test_upsample_parameter_errors(params, bottoms, match):
    x = random_blob((1, 1, 3, 3))
    with pytest.raises(LayerError, match=match):
        upsample(params, [x, blob_of(np.zeros((1, 1, 3, 3)))][:bottoms])


def test_upsample_mask_errors_name_the_cause():
    x = random_blob((1, 1, 3, 3))
    with pytest.raises(LayerError, match=r"mask .* must have the data's shape"):
        upsample("scale: 2", [x, blob_of(np.zeros((1, 1, 3, 4)))])
    mask = blob_of(np.full((1, 1, 3, 3), 36.0))
    layer, (top,) = upsample("scale: 2", [x, mask])
    with pytest.raises(LayerError, match=r"outside the 6x6 output.*upsample_h/upsample_w"):
        layer.forward([x, mask], [top])


# -- Interp ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "hw", "out"), [
    ("zoom_factor: 2", (5, 7), (9, 13)),
    ("zoom_factor: 3 pad_end: -1", (5, 7), (10, 16)),
    ("shrink_factor: 2", (5, 8), (3, 4)),
    ("shrink_factor: 2 zoom_factor: 3", (5, 8), (7, 10)),
    ("height: 11 width: 4", (5, 7), (11, 4)),
    ("zoom_factor: 2 height: 11 width: 4", (5, 7), (9, 13)),  # the fork's rule order
    ("height: 6 width: 6 pad_beg: -1 pad_end: -1", (5, 7), (6, 6)),
])
def test_interp_shapes(params, hw, out):
    _, (top,) = interp(params, random_blob((2, 3, *hw)))
    assert top.shape == (2, 3, *out)


@pytest.mark.parametrize(("params", "hw"), [
    ("zoom_factor: 2", (5, 7)),
    ("zoom_factor: 3 pad_beg: -1 pad_end: -1", (6, 6)),
    ("shrink_factor: 3", (7, 10)),
    ("height: 13 width: 1", (4, 6)),
    ("height: 1 width: 9", (4, 6)),
    ("height: 33 width: 17", (7, 5)),
    ("height: 5 width: 7", (5, 7)),  # same size: the fork's copy
])
def test_interp_forward_matches_the_fork_loop(params, hw):
    x = random_blob((2, 3, *hw), seed=7)
    layer, (top,) = interp(params, x)
    layer.forward([x], [top])
    pad_beg = int(params.split("pad_beg: ")[1].split()[0]) if "pad_beg" in params else 0
    pad_end = int(params.split("pad_end: ")[1].split()[0]) if "pad_end" in params else 0
    eff = tuple(n + pad_beg + pad_end for n in hw)
    expected = deeplab_interp(x.data, pad_beg, (*top.shape[2:], *eff))
    np.testing.assert_allclose(top.data, expected, rtol=0, atol=1e-12)


def test_interp_keeps_corners_and_is_exact_on_a_linear_ramp():
    ramp = np.add.outer(np.arange(4.0) * 3, np.arange(5.0))[None, None]
    x = blob_of(ramp)
    layer, (top,) = interp("zoom_factor: 4", x)
    layer.forward([x], [top])
    expected = np.add.outer(np.arange(13) * 3 / 4, np.arange(17) / 4)
    np.testing.assert_allclose(top.data[0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("params", [
    "zoom_factor: 2", "shrink_factor: 2", "height: 7 width: 3", "zoom_factor: 2 pad_beg: -1",
    "height: 3 width: 4 pad_end: -1",
])
def test_interp_gradient(params):
    x = random_blob((2, 2, 4, 5), seed=8)
    layer, top = interp(params, x)
    check_gradient(layer, [x], top)


def test_interp_float32_stays_float32():
    x = random_blob((1, 2, 4, 4), dtype=np.float32)
    layer, (top,) = interp("zoom_factor: 3", x, dtype=np.float32)
    layer.forward([x], [top])
    assert top.data.dtype == np.float32
    expected = deeplab_interp(x.data.astype(np.float64), 0, (10, 10, 4, 4))
    np.testing.assert_allclose(top.data, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("params", "match"), [
    ("pad_beg: 1 zoom_factor: 2", "non-positive pad_beg"),
    ("zoom_factor: 0", "zoom_factor must be >= 1"),
    ("height: 4", "give zoom_factor, shrink_factor, or height and width"),
    ("zoom_factor: 2 pad_beg: -3 pad_end: -2", "crop the whole"),
])
def test_interp_parameter_errors(params, match):
    with pytest.raises(LayerError, match=match):
        interp(params, random_blob((1, 1, 4, 4)))


@pytest.mark.parametrize(("params", "hw"), [
    ("zoom_factor: 3", (5, 7)),
    ("height: 17 width: 11", (5, 7)),
    ("height: 4 width: 3", (9, 6)),
])
def test_interp_matches_opencv(tmp_path, params, hw):
    """OpenCV's dnn module implements the fork's Interp for zoom_factor and height/width; same
    outputs to 1e-4. (OpenCV 4.x ignores shrink_factor and pad_beg/pad_end, so those are
    checked against the fork's loop only.)"""
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "interp.prototxt"
    path.write_text(f'name: "t" input: "data" input_shape {{ dim: 2 dim: 3 dim: {hw[0]} '
                    f'dim: {hw[1]} }}\nlayer {{ name: "interp" type: "Interp" bottom: "data" '
                    f'top: "out" interp_param {{ {params} }} }}\n')
    x = random_blob((2, 3, *hw), seed=9, dtype=np.float32)
    net = cv2.dnn.readNetFromCaffe(str(path))
    net.setInput(x.data)
    theirs = net.forward()
    layer, (top,) = interp(params, x, dtype=np.float32)
    layer.forward([x], [top])
    assert theirs.shape == top.shape
    np.testing.assert_allclose(top.data, theirs, rtol=0, atol=1e-4)
