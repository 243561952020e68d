"""Deconvolution and Im2col: shapes, forward against naive loops, gradients, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import make_layer, random_blob

from engine.blob import Blob
from engine.errors import LayerError

FILLERS = ' weight_filler { type: "gaussian" } bias_filler { type: "gaussian" }'


def deconv(params: str, bottoms: list[Blob], fillers: bool = True, **kwargs):
    text = f'type: "Deconvolution" convolution_param {{ {params}{FILLERS if fillers else ""} }}'
    return make_layer(text, bottoms, n_top=len(bottoms), **kwargs)


def naive_deconv(x, w, b, stride, pad, dilation, group):
    """Scatter form: input cell ``pos`` adds ``w[c, o, tap] * x`` at ``pos*stride - pad +
    tap*dilation``, dropping cells outside the output."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    og, kernel = w.shape[1], w.shape[2:]
    cg = c // group
    out = [s * (size - 1) + d * (k - 1) + 1 - 2 * p
           for size, k, s, p, d in zip(spatial, kernel, stride, pad, dilation, strict=True)]
    y = np.zeros((n, og * group, *out))
    for ni, ci in itertools.product(range(n), range(c)):
        g = ci // cg
        for pos in itertools.product(*map(range, spatial)):
            for oi in range(og):
                for tap in itertools.product(*map(range, kernel)):
                    cell = [q * s - p + t * d
                            for q, s, p, t, d in zip(pos, stride, pad, tap, dilation, strict=True)]
                    if all(0 <= i < size for i, size in zip(cell, out, strict=True)):
                        y[(ni, g * og + oi, *cell)] += w[(ci, oi, *tap)] * x[(ni, ci, *pos)]
    if b is not None:
        y += b.reshape(-1, *(1,) * len(out))
    return y


# (bottom shape, convolution_param, top shape)
CASES = [
    ((2, 3, 4, 4), "num_output: 2 kernel_size: 3", (2, 2, 6, 6)),
    ((2, 3, 4, 5), "num_output: 2 kernel_size: 4 stride: 2 pad: 1", (2, 2, 8, 10)),
    ((1, 4, 3, 3), "num_output: 6 kernel_size: 2 stride: 3 group: 2", (1, 6, 8, 8)),
    ((1, 2, 3, 4), "num_output: 2 kernel_size: 3 dilation: 2 pad: 2", (1, 2, 3, 4)),
    ((2, 2, 5), "num_output: 3 kernel_size: 3 stride: 2", (2, 3, 11)),
    ((1, 2, 2, 3, 2), "num_output: 2 kernel_size: 2 stride: 2", (1, 2, 4, 6, 4)),
]


@pytest.mark.parametrize(("shape", "params", "expected"), CASES)
def test_deconvolution_shape_and_forward(shape, params, expected):
    x = random_blob(shape)
    layer, top = deconv(params, [x])
    g = layer.geom
    assert layer.blobs[0].shape == (shape[1], expected[1] // g.group, *layer.geom.kernel)
    assert top[0].shape == expected
    layer.forward([x], top)
    want = naive_deconv(x.data, layer.blobs[0].data, layer.blobs[1].data, g.stride, g.pad,
                        g.dilation, g.group)
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "params"), [
    ((2, 3, 3, 3), "num_output: 2 kernel_size: 3"),
    ((1, 2, 3, 2), "num_output: 2 kernel_size: 4 stride: 2 pad: 1"),
    ((1, 4, 2, 3), "num_output: 2 kernel_size: 2 stride: 2 group: 2 bias_term: false"),
    ((1, 2, 3, 3), "num_output: 1 kernel_size: 2 dilation: 2 pad: 1"),
    ((2, 2, 4), "num_output: 2 kernel_size: 3 stride: 2 pad: 1"),
])
def test_deconvolution_gradient(shape, params):
    x = random_blob(shape)
    layer, top = deconv(params, [x])
    assert check_gradient(layer, [x], top) > 0


def test_deconvolution_float32_and_propagate_down():
    x = random_blob((2, 3, 4, 4), dtype=np.float32)
    layer, top = deconv("num_output: 2 kernel_size: 3 stride: 2", [x], dtype=np.float32)
    layer.forward([x], top)
    assert top[0].data.dtype == np.float32
    top[0].diff[...] = 1
    x.diff[...] = 5
    layer.backward(top, [False], [x])
    np.testing.assert_array_equal(x.diff, 5)  # bottom untouched, params still accumulate
    first = [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [False], [x])
    for blob, once in zip(layer.blobs, first, strict=True):
        np.testing.assert_allclose(blob.diff, 2 * once, rtol=1e-6)
    layer.param_propagate_down = [False, False]
    layer.backward(top, [True], [x])
    for blob, once in zip(layer.blobs, first, strict=True):
        np.testing.assert_allclose(blob.diff, 2 * once, rtol=1e-6)


def test_bilinear_grouped_deconvolution_upsamples_a_constant_image():
    x = Blob((1, 3, 4, 4), np.float64)
    x.data[...] = 2.5
    layer, top = deconv('num_output: 3 group: 3 kernel_size: 4 stride: 2 pad: 1 '
                        'bias_term: false weight_filler { type: "bilinear" }', [x], fillers=False)
    layer.forward([x], top)
    assert top[0].shape == (1, 3, 8, 8)
    np.testing.assert_allclose(top[0].data[..., 1:-1, 1:-1], 2.5)


@pytest.mark.parametrize(("shape", "params", "message"), [
    ((1, 3, 4, 4), "num_output: 2 kernel_size: 3 group: 2", "do not split into group"),
    ((1, 2, 4, 4), "num_output: 3 kernel_size: 3 group: 2", "multiple of group"),
    ((1, 2, 1, 1), "num_output: 2 kernel_size: 1 pad: 1", "leaves no output"),
    ((1, 2, 4, 4), "num_output: 2", "kernel_size"),
])
def test_deconvolution_errors(shape, params, message):
    with pytest.raises(LayerError, match=message):
        deconv(params, [random_blob(shape)])


# -- Im2col ----------------------------------------------------------------------------------
def naive_im2col(x, kernel, stride, pad, dilation):
    """Caffe's im2col: row (c, k_h, k_w) of the column matrix, per output cell."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    y = np.zeros((n, c * kh * kw, oh, ow))
    for ni, ci, i, j, a, b in itertools.product(range(n), range(c), range(kh), range(kw),
                                                range(oh), range(ow)):
        r, q = a * sh - ph + i * dh, b * sw - pw + j * dw
        if 0 <= r < h and 0 <= q < w:
            y[ni, (ci * kh + i) * kw + j, a, b] = x[ni, ci, r, q]
    return y


# (bottom shape, convolution_param, kernel, stride, pad, dilation)
IM2COL = [
    ((2, 3, 5, 5), "kernel_size: 3", (3, 3), (1, 1), (0, 0), (1, 1)),
    ((1, 2, 6, 5), "kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1",
     (2, 3), (2, 1), (0, 1), (1, 1)),
    ((1, 2, 7, 7), "kernel_size: 3 dilation: 2 pad: 2 stride: 3", (3, 3), (3, 3), (2, 2),
     (2, 2)),
]


@pytest.mark.parametrize(("shape", "params", "kernel", "stride", "pad", "dilation"), IM2COL)
def test_im2col_forward_and_gradient(shape, params, kernel, stride, pad, dilation):
    x = random_blob(shape)
    layer, top = make_layer(f'type: "Im2col" convolution_param {{ {params} }}', [x])
    want = naive_im2col(x.data, kernel, stride, pad, dilation)
    assert top[0].shape == want.shape
    layer.forward([x], top)
    np.testing.assert_array_equal(top[0].data, want)
    assert not layer.blobs
    check_gradient(layer, [x], top)


def test_im2col_backward_counts_overlaps():
    x = random_blob((1, 1, 3, 3))
    layer, top = make_layer('type: "Im2col" convolution_param { kernel_size: 2 }', [x])
    top[0].diff[...] = 1
    x.diff[...] = 9
    layer.backward(top, [True], [x])
    np.testing.assert_array_equal(x.diff[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


def test_im2col_needs_a_kernel():
    with pytest.raises(LayerError, match="kernel_size"):
        make_layer('type: "Im2col" convolution_param { stride: 2 }', [random_blob((1, 1, 3, 3))])
