"""The forks' BN layer: SegNet/ENet (LEARN and INFERENCE) and PSPNet (moving averages, frozen)
forms against the forks' loops, gradients on bottom and scale/shift, tops, blob layout,
learning-rate overrides, errors."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format
from gradcheck import check_gradient
from layer_helpers import blob_of, layer_param, make_layer, random_blob

from engine import caffe_pb2
from engine.blob import Blob
from engine.errors import LayerError
from engine.layer import TEST, TRAIN, create_layer
from engine.net import Net

FILLERS = ('scale_filler { type: "uniform" min: 0.5 max: 1.5 } '
           'shift_filler { type: "uniform" min: -1 max: 1 }')


def bn(params: str, bottom, n_top: int = 1, **kwargs):
    return make_layer(f'type: "BN" bn_param {{ {params} }}', bottom, n_top=n_top, **kwargs)


def segnet_learn(x, scale, shift):
    """bn_layer.cpp LEARN, channel by channel: var = E[x^2] - E[x]^2, eps 1e-9."""
    c = x.shape[1]
    top = np.empty_like(x)
    means, variances = np.empty(c), np.empty(c)
    for ci in range(c):
        values = x[:, ci].reshape(-1)
        mean = sum(values) / values.size
        var = sum(v * v for v in values) / values.size - mean * mean
        means[ci], variances[ci] = mean, var
        top[:, ci] = scale[ci] * (x[:, ci] - mean) / np.sqrt(var + 1e-9) + shift[ci]
    return top, means, variances


def test_blob_layout_and_fillers():
    x = random_blob((2, 3, 4, 5))
    layer, _ = bn('scale_filler { type: "constant" value: 1 } '
                  'shift_filler { type: "constant" value: 0.001 }', [x])
    assert [b.shape for b in layer.blobs] == [(1, 3, 1, 1), (1, 3, 1, 1)]
    np.testing.assert_array_equal(layer.blobs[0].data, 1)
    np.testing.assert_allclose(layer.blobs[1].data, 0.001, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 2, 1, 1), (4, 3)])
def test_learn_forward_and_statistic_tops_match_the_fork(shape):
    x = random_blob(shape, seed=1, low=-2, high=3)
    layer, top = bn(FILLERS, [x], n_top=3)
    assert top[1].shape == top[2].shape == (1, shape[1], 1, 1)
    layer.forward([x], top)
    expected, means, variances = segnet_learn(x.data, layer.blobs[0].data.reshape(-1),
                                              layer.blobs[1].data.reshape(-1))
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(top[1].data.reshape(-1), means, rtol=1e-12)
    np.testing.assert_allclose(top[2].data.reshape(-1), variances, rtol=1e-10)


def test_learn_uses_batch_statistics_in_test_phase_too():
    x = random_blob((2, 3, 3, 3), seed=2)
    layer, (top,) = bn(FILLERS, [x], phase=TEST)
    layer.forward([x], [top])
    expected, _, _ = segnet_learn(x.data, layer.blobs[0].data.reshape(-1),
                                  layer.blobs[1].data.reshape(-1))
    np.testing.assert_allclose(top.data, expected, rtol=1e-10, atol=1e-10)


def test_inference_is_scale_and_shift():
    x = random_blob((2, 3, 4, 4), seed=3)
    layer, (top,) = bn(FILLERS + " bn_mode: INFERENCE", [x])
    layer.forward([x], [top])
    scale, shift = (b.data.reshape(1, 3, 1, 1) for b in layer.blobs)
    np.testing.assert_allclose(top.data, scale * x.data + shift, rtol=1e-14)


@pytest.mark.parametrize("mode", ["LEARN", "INFERENCE"])
def test_gradient_on_bottom_scale_and_shift(mode):
    x = random_blob((2, 3, 3, 2), seed=4, low=-1, high=2)
    layer, top = bn(f"{FILLERS} bn_mode: {mode}", [x])
    check_gradient(layer, [x], top, stepsize=1e-4)


def run_bn(in_place: bool, passes: int = 1):
    x = random_blob((2, 2, 3, 3), seed=5)
    layer = create_layer(layer_param(f'type: "BN" bn_param {{ {FILLERS} }}'), TRAIN,
                         np.random.default_rng(0), np.float64)
    top = [x] if in_place else [Blob((), np.float64)]
    layer.setup([x], top)
    layer.reshape([x], top)
    layer.forward([x], top)
    y = top[0].data.copy()
    top[0].diff[...] = np.random.default_rng(6).standard_normal(x.shape)
    for _ in range(passes):
        layer.backward(top, [True], [x])
    return y, x.diff.copy(), [b.diff.copy() for b in layer.blobs]


def test_in_place_matches_out_of_place():
    (y0, dx0, d0), (y1, dx1, d1) = run_bn(False), run_bn(True)
    np.testing.assert_allclose(y1, y0, rtol=1e-14)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-12, atol=1e-14)
    for a, b in zip(d0, d1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_param_diffs_accumulate_by_hand():
    _, _, diffs = run_bn(False, passes=2)
    dy = np.random.default_rng(6).standard_normal((2, 2, 3, 3))
    x = random_blob((2, 2, 3, 3), seed=5).data
    _, _, variances = segnet_learn(x, np.ones(2), np.zeros(2))
    x_hat = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(
        variances.reshape(1, 2, 1, 1) + 1e-9)
    np.testing.assert_allclose(diffs[0].reshape(-1), 2 * (dy * x_hat).sum(axis=(0, 2, 3)),
                               rtol=1e-10)
    np.testing.assert_allclose(diffs[1].reshape(-1), 2 * dy.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_pspnet_frozen_form():
    """PSPNet's BN: four blobs; frozen uses the stored mean and variance in every phase."""
    x = random_blob((2, 3, 4, 4), seed=7)
    params = ('slope_filler { type: "constant" value: 1 } bias_filler { type: "constant" '
              'value: 0 } frozen: true momentum: 0.95')
    layer, (top,) = bn(params, [x])
    assert [b.shape for b in layer.blobs] == [(1, 3, 1, 1)] * 4
    np.testing.assert_array_equal(layer.blobs[3].data, 1)  # the fork's frozen start
    rng = np.random.default_rng(8)
    for blob in layer.blobs:
        blob.data[...] = rng.uniform(0.5, 1.5, blob.shape)
    layer.forward([x], [top])
    slope, bias, mean, var = (b.data.reshape(1, 3, 1, 1) for b in layer.blobs)
    eps = float(np.float32(1e-5))  # bn_param.eps is a float
    np.testing.assert_allclose(top.data, slope * (x.data - mean) / np.sqrt(var + eps) + bias,
                               rtol=1e-12)
    check_gradient(layer, [x], [top], check_params=False)


PSP_TRAIN = ('slope_filler { type: "uniform" min: 0.5 max: 1.5 } bias_filler { type: "uniform" '
             'min: -1 max: 1 } momentum: 0.95')


def test_pspnet_training_normalizes_by_the_batch_and_updates_moving_averages():
    x = random_blob((2, 3, 4, 4), seed=9, low=-1, high=3)
    layer, (top,) = bn(PSP_TRAIN, [x])
    old_mean, old_var = np.full((1, 3, 1, 1), 0.5), np.full((1, 3, 1, 1), 2.0)
    layer.blobs[2].data[...], layer.blobs[3].data[...] = old_mean, old_var
    layer.forward([x], [top])
    mean = x.data.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x.data - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    slope, bias = (b.data for b in layer.blobs[:2])
    eps = float(np.float32(1e-5))
    np.testing.assert_allclose(top.data, slope * (x.data - mean) / np.sqrt(var + eps) + bias,
                               rtol=1e-12)
    momentum = float(np.float32(0.95))
    np.testing.assert_allclose(layer.blobs[2].data, (1 - momentum) * mean + momentum * old_mean,
                               rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[3].data, (1 - momentum) * var + momentum * old_var,
                               rtol=1e-12)
    check_gradient(layer, [x], [top], stepsize=1e-4)


@pytest.mark.parametrize(("params", "learned"), [
    (PSP_TRAIN, [1, 1, 0, 0]),
    (PSP_TRAIN + " frozen: true", [0, 0, 0, 0]),
    (FILLERS, [1, 1]),
])
def test_pspnet_statistics_are_never_learned(params, learned):
    """The fork overrides lr_mult and decay_mult of the statistics (and of everything when
    frozen), whatever the prototxt says."""
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 '
            'dim: 2 dim: 2 } } } layer { name: "bn" type: "BN" bottom: "x" top: "y" '
            f'param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 1 }} '
            f'bn_param {{ {params} }} }}')
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), TRAIN)
    assert net.params_lr == learned
    assert net.params_weight_decay[2:] == [0] * (len(learned) - 2)


def test_four_stored_blobs_mean_the_pspnet_form():
    param = layer_param('type: "BN"')
    for value in (2.0, 0.5, 1.0, 4.0):
        blob = param.blobs.add()
        blob.shape.dim.extend([1, 2, 1, 1])
        blob.data.extend([value, value])
    layer = create_layer(param, TEST, np.random.default_rng(0), np.float64)
    x, top = blob_of(np.full((1, 2, 1, 1), 3.0)), Blob((), np.float64)
    layer.setup([x], [top])
    layer.reshape([x], [top])
    layer.forward([x], [top])
    eps = float(np.float32(1e-5))
    np.testing.assert_allclose(top.data, 2.0 * (3.0 - 1.0) / np.sqrt(4.0 + eps) + 0.5)


@pytest.mark.parametrize(("params", "n_top", "match"), [
    ("bn_mode: INFERENCE", 2, "INFERENCE has one top"),
    ("frozen: true", 2, "PSPNet's BN form has one top"),
])
def test_top_count_errors(params, n_top, match):
    with pytest.raises(LayerError, match=match):
        bn(params, [random_blob((1, 2, 2, 2))], n_top=n_top)


def test_channel_change_is_refused():
    x = random_blob((1, 2, 2, 2))
    layer, top = bn(FILLERS, [x])
    with pytest.raises(LayerError, match="must have 2 channels"):
        layer.reshape([random_blob((1, 3, 2, 2))], top)
