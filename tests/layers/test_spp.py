"""SPP: shapes, forward against a naive pyramid of poolings, gradients, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import make_layer, random_blob

from engine.errors import LayerError


def spp(params: str, bottom, **kwargs):
    return make_layer(f'type: "SPP" spp_param {{ {params} }}', [bottom], **kwargs)


def caffe_pool_out(size, kernel, pad):
    """Pooling's output size with stride = kernel: ceil, less a window starting in the pad."""
    out = math.ceil((size + 2 * pad - kernel) / kernel) + 1
    return out - 1 if pad and (out - 1) * kernel >= size + pad else out


def naive_level(x, level, method):
    """One pyramid level by Caffe's pooling loops: kernel = stride = ceil(size / 2^l), pad half
    the shortfall; windows clipped to the image; AVE divides by the window clipped only to the
    padded image."""
    n, c, h, w = x.shape
    bins = 2 ** level
    kh, kw = math.ceil(h / bins), math.ceil(w / bins)
    ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
    oh, ow = caffe_pool_out(h, kh, ph), caffe_pool_out(w, kw, pw)
    y = np.zeros((n, c, oh, ow))
    for i, j in itertools.product(range(oh), range(ow)):
        hs, ws = i * kh - ph, j * kw - pw
        he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
        area = (he - hs) * (we - ws)
        window = x[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
        if method == "MAX":
            y[:, :, i, j] = window.max(axis=(2, 3))
        else:
            y[:, :, i, j] = window.sum(axis=(2, 3)) / area
    return y


# (bottom shape, spp_param, top shape)
SHAPES = [
    ((2, 3, 8, 8), "pyramid_height: 3", (2, 3 * (1 + 4 + 16))),
    ((2, 3, 7, 9), "pyramid_height: 2 pool: AVE", (2, 3 * (1 + 4))),
    ((1, 2, 12, 10), "pyramid_height: 3 pool: MAX", (1, 2 * (1 + 4 + 16))),
    ((2, 3, 5, 6), "pyramid_height: 1", (2, 3, 1, 1)),
]


@pytest.mark.parametrize(("shape", "params", "expected"), SHAPES)
def test_shape_and_forward(shape, params, expected):
    x = random_blob(shape)
    layer, top = spp(params, x)
    assert top[0].shape == expected
    layer.forward([x], top)
    method = "AVE" if "AVE" in params else "MAX"
    levels = [naive_level(x.data, level, method) for level in range(layer.height)]
    if layer.height == 1:
        want = levels[0]
    else:
        want = np.concatenate([lv.reshape(shape[0], -1) for lv in levels], axis=1)
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12)


def test_the_top_level_is_the_global_pool():
    x = random_blob((2, 3, 6, 5))
    layer, top = spp("pyramid_height: 2 pool: AVE", x)
    layer.forward([x], top)
    np.testing.assert_allclose(top[0].data[:, :3], x.data.mean(axis=(2, 3)))


@pytest.mark.parametrize(("shape", "params"), [
    ((2, 2, 4, 4), "pyramid_height: 2 pool: MAX"),
    ((1, 2, 5, 6), "pyramid_height: 2 pool: AVE"),
    ((1, 2, 4, 3), "pyramid_height: 1 pool: AVE"),
    ((1, 1, 8, 8), "pyramid_height: 3 pool: AVE"),
])
def test_gradient(shape, params):
    x = random_blob(shape)
    layer, top = spp(params, x)
    assert check_gradient(layer, [x], top) > 0


def test_follows_a_reshaped_bottom():
    x = random_blob((1, 2, 4, 4))
    layer, top = spp("pyramid_height: 2", x)
    x.reshape(3, 2, 6, 7)
    x.data[...] = random_blob((3, 2, 6, 7), seed=3).data
    layer.reshape([x], top)
    layer.forward([x], top)
    assert top[0].shape == (3, 10)
    np.testing.assert_allclose(top[0].data[:, 2:], naive_level(x.data, 1, "MAX").reshape(3, -1))


def test_float32_backward_overwrites_the_bottom_diff():
    x = random_blob((2, 2, 4, 4), dtype=np.float32)
    layer, top = spp("pyramid_height: 2 pool: AVE", x, dtype=np.float32)
    layer.forward([x], top)
    assert top[0].data.dtype == np.float32
    top[0].diff[...] = 1
    x.diff[...] = 100
    layer.backward(top, [True], [x])
    # every cell: 1/16 from the global bin plus 1/4 from its 2x2 bin
    np.testing.assert_allclose(x.diff, 1 / 16 + 1 / 4, rtol=1e-6)


@pytest.mark.parametrize(("shape", "params", "message"), [
    ((1, 1, 4, 4), "", "pyramid_height must be positive"),
    ((1, 1, 4), "pyramid_height: 2", "4 axes"),
    ((1, 1, 5, 5), "pyramid_height: 3", "cannot pool"),
])
def test_errors(shape, params, message):
    with pytest.raises(LayerError, match=message):
        spp(params, random_blob(shape))
