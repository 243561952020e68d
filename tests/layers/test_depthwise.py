"""DepthwiseConvolution and ConvolutionDepthwise (and Convolution with group == channels ==
num_output, which takes the same direct kernel): shapes, forward against a naive loop and
against grouped im2col, gradients (direct kernel and the grouped path)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import make_layer, random_blob

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" }'


def depthwise(kind: str, params: str, bottom, **kwargs):
    text = f'type: "{kind}" convolution_param {{ {params} {FILLERS} }}'
    return make_layer(text, [bottom], **kwargs)


def naive_depthwise(x, w, b, stride, pad, dilation):
    """One filter per channel, one output cell and one tap at a time (2-d)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    oh = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    y = np.zeros((n, c, oh, ow))
    for ni, ci, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        acc = 0.0 if b is None else b[ci]
        for p, q in itertools.product(range(kh), range(kw)):
            row = i * stride[0] - pad[0] + p * dilation[0]
            col = j * stride[1] - pad[1] + q * dilation[1]
            if 0 <= row < h and 0 <= col < wd:
                acc += w[ci, 0, p, q] * x[ni, ci, row, col]
        y[ni, ci, i, j] = acc
    return y


# (convolution_param for 4 channels, stride, pad, dilation, top spatial size on 7x8)
CASES = [
    ("kernel_size: 3", (1, 1), (0, 0), (1, 1), (5, 6)),
    ("kernel_size: 3 pad: 1", (1, 1), (1, 1), (1, 1), (7, 8)),
    ("kernel_size: 3 pad: 1 stride: 2", (2, 2), (1, 1), (1, 1), (4, 4)),
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (2, 1), (1, 0),
     (1, 1), (4, 7)),
    ("kernel_size: 3 pad: 2 dilation: 2", (1, 1), (2, 2), (2, 2), (7, 8)),
    ("kernel_size: 3 pad: 1 bias_term: false", (1, 1), (1, 1), (1, 1), (7, 8)),
]
IDS = ["plain", "pad", "stride2", "rect", "dilated", "nobias"]


@pytest.mark.parametrize("kind", ["DepthwiseConvolution", "ConvolutionDepthwise"])
@pytest.mark.parametrize(("params", "stride", "pad", "dilation", "size"), CASES, ids=IDS)
def test_forward_matches_naive_loop(kind, params, stride, pad, dilation, size):
    x = random_blob((2, 4, 7, 8), seed=3)
    if kind == "DepthwiseConvolution":
        params += " num_output: 4 group: 4"
    layer, top = depthwise(kind, params, x)
    assert layer.direct
    assert top[0].shape == (2, 4, *size)
    assert layer.blobs[0].shape == (4, 1, *layer.geom.kernel)
    layer.forward([x], top)
    bias = layer.blobs[1].data if layer.bias_term else None
    expected = naive_depthwise(x.data, layer.blobs[0].data, bias, stride, pad, dilation)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("params", "stride", "pad", "dilation", "size"), CASES, ids=IDS)
def test_same_as_grouped_convolution_forward_and_backward(params, stride, pad, dilation, size):
    x = random_blob((3, 5, 7, 8), seed=4)
    params += " num_output: 5 group: 5"
    direct, top = depthwise("DepthwiseConvolution", params, x, seed=2)
    grouped, top_g = depthwise("Convolution", params, x, seed=2)
    assert grouped.direct
    grouped.direct = False  # im2col + one GEMM per group, as for any other grouping
    np.testing.assert_array_equal(direct.blobs[0].data, grouped.blobs[0].data)
    direct.forward([x], top)
    grouped.forward([x], top_g)
    np.testing.assert_allclose(top[0].data, top_g[0].data, rtol=1e-12, atol=1e-12)
    dy = np.random.default_rng(5).standard_normal(top[0].shape)
    grads = []
    for layer, t in ((direct, top), (grouped, top_g)):
        t[0].diff[...] = dy
        for blob in layer.blobs:
            blob.diff[...] = 0.5  # parameter diffs accumulate
        layer.backward(t, [True], [x])
        grads.append([x.diff.copy(), *(b.diff.copy() for b in layer.blobs)])
    for ours, theirs in zip(*grads, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["DepthwiseConvolution", "ConvolutionDepthwise"])
@pytest.mark.parametrize("params", ["kernel_size: 3 pad: 1 stride: 2",
                                    "kernel_h: 2 kernel_w: 3 pad: 1 dilation: 2",
                                    "kernel_size: 3 bias_term: false"])
def test_gradient(kind, params):
    x = random_blob((2, 3, 6, 5), seed=6)
    if kind == "DepthwiseConvolution":
        params += " num_output: 3 group: 3"
    layer, top = depthwise(kind, params, x)
    assert check_gradient(layer, [x], top) > 0


def test_convolution_depthwise_ignores_num_output_and_group():
    """farmingyard's layer takes its output channels from the bottom, whatever is written."""
    x = random_blob((1, 6, 5, 5), seed=7)
    layer, top = depthwise("ConvolutionDepthwise", "num_output: 12 group: 2 kernel_size: 3", x)
    assert top[0].shape == (1, 6, 3, 3)
    assert [b.shape for b in layer.blobs] == [(6, 1, 3, 3), (6,)]
    assert layer.param.name == "convolutiondepthwise"


def test_channel_multiplier_falls_back_to_grouped_convolution():
    """num_output = 2 * group: each input channel feeds two outputs; Caffe's grouped layout."""
    x = random_blob((2, 3, 5, 5), seed=8)
    layer, top = depthwise("DepthwiseConvolution", "num_output: 6 group: 3 kernel_size: 3", x)
    assert not layer.direct
    assert layer.blobs[0].shape == (6, 1, 3, 3)
    layer.forward([x], top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    for o in range(6):  # output o reads input o // 2
        single = naive_depthwise(x.data[:, [o // 2]], w[[o]], b[[o]], (1, 1), (0, 0), (1, 1))
        np.testing.assert_allclose(top[0].data[:, [o]], single, rtol=1e-12, atol=1e-12)
    assert check_gradient(layer, [x], top) > 0


def test_float32_batch_and_resize():
    x = random_blob((4, 8, 9, 9), seed=9, dtype=np.float32)
    layer, top = depthwise("DepthwiseConvolution",
                           "num_output: 8 group: 8 kernel_size: 3 pad: 1", x, dtype=np.float32)
    layer.forward([x], top)
    assert top[0].data.dtype == np.float32
    expected = naive_depthwise(x.data.astype(np.float64), layer.blobs[0].data, layer.blobs[1].data,
                               (1, 1), (1, 1), (1, 1))
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-5, atol=1e-5)
    x.reshape((1, 8, 4, 6))
    x.data[...] = 1
    layer.reshape([x], top)
    layer.forward([x], top)
    assert top[0].shape == (1, 8, 4, 6)
    centre = layer.blobs[0].data.sum(axis=(1, 2, 3)) + layer.blobs[1].data
    np.testing.assert_allclose(top[0].data[0, :, 1, 1], centre, rtol=1e-5)
