"""Convolution: shapes, forward against a naive loop, gradients, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine import kernels
from engine.blob import Blob
from engine.errors import LayerError
from engine.kernels import ConvGeometry


def conv(params: str, bottoms: list[Blob], fillers: bool = True, **kwargs):
    if fillers:
        params += ' weight_filler { type: "gaussian" } bias_filler { type: "gaussian" }'
    text = f'type: "Convolution" convolution_param {{ {params} }}'
    return make_layer(text, bottoms, n_top=len(bottoms), **kwargs)


def naive_conv(x, w, b, stride, pad, dilation, group):
    """Caffe's definition, one output cell and one tap at a time."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    o, kernel = w.shape[0], w.shape[2:]
    cg, og = c // group, o // group
    out = [(size + 2 * p - (d * (k - 1) + 1)) // s + 1
           for size, k, s, p, d in zip(spatial, kernel, stride, pad, dilation, strict=True)]
    y = np.zeros((n, o, *out))
    for ni, oi in itertools.product(range(n), range(o)):
        g = oi // og
        for pos in itertools.product(*map(range, out)):
            acc = 0.0 if b is None else b[oi]
            for ci in range(cg):
                for tap in itertools.product(*map(range, kernel)):
                    cell = [q * s - p + t * d
                            for q, s, p, t, d in zip(pos, stride, pad, tap, dilation, strict=True)]
                    if all(0 <= i < size for i, size in zip(cell, spatial, strict=True)):
                        acc += w[(oi, ci, *tap)] * x[(ni, g * cg + ci, *cell)]
            y[(ni, oi, *pos)] = acc
    return y


# (bottom shape, convolution_param, top shape)
SHAPES = [
    ((2, 3, 8, 8), "num_output: 4 kernel_size: 3", (2, 4, 6, 6)),
    ((2, 3, 8, 8), "num_output: 4 kernel_size: 3 pad: 1", (2, 4, 8, 8)),
    ((2, 3, 9, 8), "num_output: 5 kernel_size: 3 stride: 2", (2, 5, 4, 3)),
    ((1, 2, 7, 9), "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 "
                   "pad_w: 2", (1, 2, 4, 4)),
    ((1, 2, 9, 9), "num_output: 2 kernel_size: 3 dilation: 3", (1, 2, 3, 3)),
    ((1, 4, 6, 6), "num_output: 6 kernel_size: 1 group: 2", (1, 6, 6, 6)),
    ((2, 3, 10), "num_output: 2 kernel_size: 3 stride: 2", (2, 2, 4)),
    ((1, 2, 5, 6, 7), "num_output: 3 kernel_size: 2 kernel_size: 3 kernel_size: 1 pad: 1",
     (1, 3, 6, 6, 9)),
    ((2, 3, 2, 6, 6), "num_output: 4 kernel_size: 3 axis: 2", (2, 3, 4, 4, 4)),
]


@pytest.mark.parametrize(("shape", "params", "expected"), SHAPES)
def test_top_shape(shape, params, expected):
    _, top = conv(params, [random_blob(shape)])
    assert top[0].shape == expected


@pytest.mark.parametrize(("params", "c", "weight", "n_blobs"), [
    ("num_output: 4 kernel_size: 3", 3, (4, 3, 3, 3), 2),
    ("num_output: 4 kernel_h: 1 kernel_w: 5 group: 2 bias_term: false", 6, (4, 3, 1, 5), 1),
    ("num_output: 3 kernel_size: 2 kernel_size: 3 kernel_size: 4", 2, (3, 2, 2, 3, 4), 2),
])
def test_parameter_shapes(params, c, weight, n_blobs):
    shape = (1, c, 6, 6, 6) if weight[2:] == (2, 3, 4) else (1, c, 6, 6)
    layer, _ = conv(params, [random_blob(shape)])
    assert [b.shape for b in layer.blobs] == [weight, (weight[0],)][:n_blobs]


def test_default_fillers_are_zero():
    layer, _ = conv("num_output: 2 kernel_size: 3", [random_blob((1, 1, 4, 4))], fillers=False)
    assert not layer.blobs[0].data.any() and not layer.blobs[1].data.any()


# (bottom shape, convolution_param); both im2col storage orders occur (see the test below)
FORWARD = [
    ((2, 3, 7, 6), "num_output: 4 kernel_size: 3"),
    ((2, 3, 7, 6), "num_output: 4 kernel_size: 3 pad: 2 stride: 2"),
    ((2, 2, 7, 8), "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 "
                   "pad_w: 2"),
    ((2, 2, 9, 8), "num_output: 3 kernel_size: 3 dilation: 2 pad: 1"),
    ((2, 2, 9, 8), "num_output: 3 kernel_size: 2 dilation: 2 dilation: 3 stride: 2"),
    ((2, 4, 6, 5), "num_output: 6 kernel_size: 3 group: 2 pad: 1"),
    ((2, 6, 5, 5), "num_output: 3 kernel_size: 2 group: 3 bias_term: false"),
    ((2, 16, 6, 5), "num_output: 4 kernel_size: 3 group: 2 pad: 1 stride: 2"),
    ((2, 8, 5, 6), "num_output: 5 kernel_h: 2 kernel_w: 3 bias_term: false"),
    ((2, 3, 11), "num_output: 2 kernel_size: 3 stride: 2 pad: 1 dilation: 2"),
    ((1, 2, 4, 5, 6), "num_output: 2 kernel_size: 2 stride: 1 stride: 2 stride: 2 pad: 1"),
    ((2, 4, 3, 20), "num_output: 4 kernel_size: 3 group: 2 pad: 1"),
]


@pytest.mark.parametrize(("shape", "params"), FORWARD)
def test_forward_matches_naive_loop(shape, params):
    x = random_blob(shape)
    layer, top = conv(params, [x])
    layer.forward([x], top)
    g = layer.geom
    bias = layer.blobs[1].data if len(layer.blobs) > 1 else None
    expected = naive_conv(x.data, layer.blobs[0].data, bias, g.stride, g.pad, g.dilation,
                          g.group)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-12)


def test_forward_with_leading_axes():
    x = random_blob((2, 3, 2, 6, 5))
    layer, top = conv("num_output: 2 kernel_size: 3 axis: 2 pad: 1", [x])
    layer.forward([x], top)
    flat = x.data.reshape(6, 2, 6, 5)
    expected = naive_conv(flat, layer.blobs[0].data, layer.blobs[1].data, (1, 1), (1, 1),
                          (1, 1), 1)
    np.testing.assert_allclose(top[0].data, expected.reshape(2, 3, 2, 6, 5), atol=1e-12)


def test_forward_hand_computed():
    x = blob_of(np.arange(16.0).reshape(1, 1, 4, 4))
    layer, top = conv("num_output: 1 kernel_size: 2 stride: 2", [x], fillers=False)
    layer.blobs[0].data[...] = [[[[1, 0], [0, -1]]]]
    layer.blobs[1].data[...] = 0.5
    layer.forward([x], top)
    np.testing.assert_array_equal(top[0].data, np.full((1, 1, 2, 2), -4.5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype):
    x = random_blob((2, 3, 6, 6), dtype=dtype)
    layer, top = conv("num_output: 4 kernel_size: 3", [x], dtype=dtype)
    layer.forward([x], top)
    top[0].diff[...] = 1
    layer.backward(top, [True], [x])
    assert top[0].data.dtype == x.diff.dtype == layer.blobs[0].diff.dtype == dtype


def test_float32_matches_float64():
    x64 = random_blob((2, 12, 7, 7))
    x32 = blob_of(x64.data, np.float32)
    l64, t64 = conv("num_output: 5 kernel_size: 3 pad: 1 group: 1", [x64])
    l32, t32 = conv("num_output: 5 kernel_size: 3 pad: 1 group: 1", [x32], dtype=np.float32)
    for b32, b64 in zip(l32.blobs, l64.blobs, strict=True):
        b32.data[...] = b64.data
    l64.forward([x64], t64)
    l32.forward([x32], t32)
    np.testing.assert_allclose(t32[0].data, t64[0].data, rtol=1e-4, atol=1e-4)


GRADIENT = [
    ((2, 3, 5, 4), "num_output: 2 kernel_size: 3 pad: 1"),
    ((1, 2, 3, 12), "num_output: 2 kernel_size: 2 pad: 1"),
    ((1, 2, 5, 14), "num_output: 2 kernel_size: 3 dilation: 2 group: 2 pad: 1"),
    ((2, 2, 6, 7), "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 "
                   "pad_w: 2"),
    ((1, 2, 7, 7), "num_output: 2 kernel_size: 2 dilation: 2 stride: 2 pad: 1"),
    ((2, 4, 4, 4), "num_output: 4 kernel_size: 2 group: 2 bias_term: false"),
    ((1, 16, 4, 4), "num_output: 4 kernel_size: 3 group: 2 pad: 1 stride: 2"),
    ((2, 2, 7), "num_output: 3 kernel_size: 3 stride: 2 pad: 1"),
    ((1, 2, 3, 4, 4), "num_output: 2 kernel_size: 2 stride: 2 pad: 1"),
]


@pytest.mark.parametrize(("shape", "params"), GRADIENT)
def test_gradient(shape, params):
    x = random_blob(shape)
    layer, top = conv(params, [x])
    assert check_gradient(layer, [x], top) > 0


def test_two_bottoms_share_weights_and_accumulate():
    a, b = random_blob((2, 3, 5, 5), seed=1), random_blob((2, 3, 5, 5), seed=2)
    layer, top = conv("num_output: 2 kernel_size: 3", [a, b])
    check_gradient(layer, [a, b], top)
    single, single_top = conv("num_output: 2 kernel_size: 3", [a])
    single.forward([a], single_top)
    np.testing.assert_allclose(top[0].data, single_top[0].data)


def test_parameter_diffs_accumulate_and_respect_propagate_down():
    x = random_blob((2, 3, 5, 5))
    layer, top = conv("num_output: 2 kernel_size: 3", [x])
    layer.forward([x], top)
    top[0].diff[...] = 1
    layer.backward(top, [False], [x])
    once = [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [False], [x])
    for blob, first in zip(layer.blobs, once, strict=True):
        np.testing.assert_allclose(blob.diff, 2 * first)
    layer.param_propagate_down = [False, True]
    layer.backward(top, [False], [x])
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once[0])
    np.testing.assert_allclose(layer.blobs[1].diff, 3 * once[1])


def test_backward_recomputes_columns_for_a_new_bottom():
    x, other = random_blob((2, 3, 5, 5), seed=1), random_blob((2, 3, 5, 5), seed=2)
    layer, top = conv("num_output: 2 kernel_size: 3", [x])
    layer.forward([x], top)
    top[0].diff[...] = 1
    layer.backward(top, [False], [other])  # not the bottom forward saw
    fresh, fresh_top = conv("num_output: 2 kernel_size: 3", [other])
    fresh.forward([other], fresh_top)
    fresh_top[0].diff[...] = 1
    fresh.backward(fresh_top, [False], [other])
    np.testing.assert_allclose(layer.blobs[0].diff, fresh.blobs[0].diff)


def test_batch_size_change_reshapes():
    x = random_blob((2, 3, 6, 6))
    layer, top = conv("num_output: 2 kernel_size: 3", [x])
    layer.forward([x], top)
    x.reshape((5, 3, 6, 6))
    x.data[...] = np.random.default_rng(3).uniform(-1, 1, x.shape)
    layer.reshape([x], top)
    layer.forward([x], top)
    expected = naive_conv(x.data, layer.blobs[0].data, layer.blobs[1].data, (1, 1), (0, 0),
                          (1, 1), 1)
    np.testing.assert_allclose(top[0].data, expected, atol=1e-12)


@pytest.mark.parametrize("table", [FORWARD, GRADIENT])
def test_both_storage_layouts_are_exercised(table):
    layouts = set()
    for shape, params in table:
        layer, top = conv(params, [random_blob(shape)])
        layouts.add(layer.geom.channels_last(shape[1], top[0].shape[-1]))
    assert layouts == {True, False}


def test_storage_layout_follows_the_longer_copy_runs():
    geom = ConvGeometry((5, 5), (1, 1), (2, 2), (1, 1))
    assert not geom.channels_last(3, 32) and geom.channels_last(32, 16)
    assert geom.channels_last(1, 4) and not geom.channels_last(1, 24)


@pytest.mark.parametrize(("shape", "params", "message"), [
    ((1, 3, 5, 5), "num_output: 2", "kernel_size"),
    ((1, 3, 5, 5), "num_output: 2 kernel_h: 3", "kernel_h and kernel_w"),
    ((1, 3, 5, 5), "num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
    ((1, 3, 5, 5), "num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3",
     "once per spatial axis"),
    ((1, 3, 5, 5, 5), "num_output: 2 kernel_h: 3 kernel_w: 3", "2-d convolution only"),
    ((1, 3, 5, 5), "num_output: 2 kernel_size: 0", "positive"),
    ((1, 3, 5, 5), "num_output: 2 kernel_size: 3 stride: 0", "positive"),
    ((1, 3, 5, 5), "num_output: 0 kernel_size: 3", "num_output"),
    ((1, 3, 5, 5), "num_output: 2 kernel_size: 3 group: 2", "group 2"),
    ((1, 4, 5, 5), "num_output: 3 kernel_size: 3 group: 2", "multiple of group"),
    ((1, 3, 5, 5), "num_output: 2 kernel_size: 7", "larger than the padded input"),
    ((1, 3), "num_output: 2 kernel_size: 1", "spatial axis"),
    ((1, 3, 5, 5), "num_output: 2 kernel_size: 3 axis: 4", "out of range"),
])
def test_bad_parameters(shape, params, message):
    with pytest.raises(LayerError, match=message):
        conv(params, [random_blob(shape)])


def test_bottom_shape_errors():
    a, b = random_blob((1, 3, 5, 5)), random_blob((1, 3, 6, 5))
    with pytest.raises(LayerError, match="one shape"):
        conv("num_output: 2 kernel_size: 3", [a, b])
    layer, top = conv("num_output: 2 kernel_size: 3", [a])
    with pytest.raises(LayerError, match="channels"):
        layer.reshape([random_blob((1, 4, 5, 5))], top)


# -- batch blocks (kernels.conv_forward_blocked / conv_backward_blocked) -----------------------
@pytest.mark.parametrize(("n", "item", "budget", "expected"), [
    (5, 10, 20, [(0, 1), (1, 2), (2, 3), (3, 5)]), (4, 10, 1000, [(0, 4)]),
    (3, 10, 1, [(0, 1), (1, 2), (2, 3)]), (100, 204800, 8 << 20, [(0, 25), (25, 50), (50, 75),
                                                                   (75, 100)]),
    (100, 819200, 8 << 20, [(10 * i, 10 * i + 10) for i in range(10)])])
def test_conv_blocks_cover_the_batch(n, item, budget, expected):
    assert kernels.conv_blocks(n, item, budget) == expected


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of one or two images (two block lengths in one batch of 5)."""
    monkeypatch.setattr(kernels, "CONV_BLOCK_BYTES", 1)

    def use(item_bytes_per_block: int) -> None:
        monkeypatch.setattr(kernels, "CONV_BLOCK_BYTES", item_bytes_per_block)
    return use


@pytest.mark.parametrize(("shape", "params"), [FORWARD[1], FORWARD[5], FORWARD[10]])
@pytest.mark.parametrize("images_per_block", [1, 2])
def test_forward_in_batch_blocks_matches_naive_loop(small_blocks, shape, params,
                                                    images_per_block):
    x = random_blob((5, *shape[1:]))
    layer, top = conv(params, [x])
    g = layer.geom
    small_blocks(images_per_block * kernels.column_bytes(x.data.reshape(5, *shape[1:]), g))
    assert len(kernels.conv_blocks(5, kernels.column_bytes(x.data, g))) > 1
    layer.forward([x], top)
    bias = layer.blobs[1].data if len(layer.blobs) > 1 else None
    expected = naive_conv(x.data, layer.blobs[0].data, bias, g.stride, g.pad, g.dilation,
                          g.group)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "params"), [GRADIENT[0], GRADIENT[2], GRADIENT[6]])
def test_gradient_in_batch_blocks(small_blocks, shape, params):
    x = random_blob((3, *shape[1:]))
    layer, top = conv(params, [x])
    small_blocks(2 * kernels.column_bytes(x.data, layer.geom))  # blocks of 1 and 2 images
    assert check_gradient(layer, [x], top) > 0



@pytest.mark.parametrize(("block_bytes", "rebuilt"), [(None, 0), (1, 3)])
def test_backward_reuses_the_columns_of_a_one_block_forward(monkeypatch, block_bytes, rebuilt):
    if block_bytes is not None:
        monkeypatch.setattr(kernels, "CONV_BLOCK_BYTES", block_bytes)  # one image a block
    x = random_blob((3, 2, 5, 5))
    layer, top = conv("num_output: 2 kernel_size: 3", [x])
    layer.forward([x], top)
    built = []
    original = kernels.conv_columns
    monkeypatch.setattr(kernels, "conv_columns",
                        lambda *args: built.append(1) or original(*args))
    top[0].diff[...] = 1
    layer.backward(top, [True], [x])
    assert len(built) == rebuilt
    fresh, fresh_top = conv("num_output: 2 kernel_size: 3", [x])
    fresh.blobs[0].data[...] = layer.blobs[0].data
    fresh_top[0].diff[...] = 1
    fresh.backward(fresh_top, [True], [x])  # no forward: its columns are built
    np.testing.assert_allclose(layer.blobs[0].diff, fresh.blobs[0].diff, rtol=1e-12)


def test_a_failing_block_in_backward_reaches_the_caller(small_blocks, monkeypatch):
    from engine import parallel

    x = random_blob((6, 2, 5, 5))
    layer, top = conv("num_output: 2 kernel_size: 3", [x])
    small_blocks(kernels.column_bytes(x.data, layer.geom))  # one image a block
    monkeypatch.setattr(parallel, "MIN_THREAD_WORK", 1)
    previous = parallel.set_num_threads(2)
    original, calls = kernels.conv_backward_data, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("block failed")
        return original(*args, **kwargs)
    monkeypatch.setattr(kernels, "conv_backward_data", fails_once)
    try:
        layer.forward([x], top)
        top[0].diff[...] = 1
        with pytest.raises(RuntimeError, match="block failed"):
            layer.backward(top, [True], [x])
    finally:
        parallel.set_num_threads(previous)
