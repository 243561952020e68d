"""LRN, BatchNorm and MVN: shapes, forward against naive loops and hand-computed statistics,
gradients, BatchNorm's accumulators and lr_mult rules, in-place backward, errors."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format
from gradcheck import check_gradient
from layer_helpers import blob_of, layer_param, make_layer, random_blob, run_forward_backward

import engine
from engine import caffe_pb2
from engine.errors import LayerError
from engine.layer import TEST, TRAIN, create_layer
from engine.net import Net

run = run_forward_backward


# -- LRN ----------------------------------------------------------------------------------------

def lrn_text(size: int, region: str, alpha=0.7, beta=0.6, k=2.0) -> str:
    return (f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} '
            f'norm_region: {region} }}')


def lrn_reference(x: np.ndarray, size: int, region: str, alpha: float, beta: float,
                  k: float) -> np.ndarray:
    """Caffe's LRN, one output at a time."""
    half = (size - 1) // 2
    _, c_, h_, w_ = x.shape
    y = np.empty_like(x)
    for n, c, h, w in np.ndindex(x.shape):
        if region == "ACROSS_CHANNELS":
            window = x[n, max(c - half, 0):min(c + half + 1, c_), h, w]
            scale = k + alpha / size * np.sum(window**2)
        else:  # AVE pooling of x^2 with pad (n-1)/2: the divisor is size^2 everywhere
            window = x[n, c, max(h - half, 0):min(h + half + 1, h_),
                       max(w - half, 0):min(w + half + 1, w_)]
            scale = 1 + alpha * np.sum(window**2) / size**2
        y[n, c, h, w] = x[n, c, h, w] * scale**-beta
    return y


# float32 proto fields, as the layer reads them
ALPHA, BETA, K = (float(np.float32(v)) for v in (0.7, 0.6, 2.0))


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
@pytest.mark.parametrize("size, shape", [(1, (2, 3, 3, 4)), (3, (2, 4, 3, 5)),
                                         (5, (1, 7, 4, 6)), (5, (2, 2, 2, 3))])
def test_lrn_forward_matches_naive_loop(region, size, shape):
    x = np.random.default_rng(0).uniform(-2, 2, shape)
    y, _ = run(lrn_text(size, region), x, np.ones_like(x), in_place=False)
    expected = lrn_reference(x, size, region, ALPHA, BETA, K)
    np.testing.assert_allclose(y, expected, rtol=1e-13)


def test_lrn_within_channel_ignores_k():
    x = np.random.default_rng(1).uniform(-2, 2, (1, 2, 4, 4))
    y1, _ = run(lrn_text(3, "WITHIN_CHANNEL", k=1), x, x, False)
    y5, _ = run(lrn_text(3, "WITHIN_CHANNEL", k=5), x, x, False)
    np.testing.assert_array_equal(y1, y5)


def test_lrn_across_channels_by_hand():
    # one pixel, channels [1, 2, 3], n = 3, alpha = 3, beta = 1, k = 1: scale_c = 1 + sum/1
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    y, _ = run(lrn_text(3, "ACROSS_CHANNELS", alpha=3, beta=1, k=1), x, x, False)
    np.testing.assert_allclose(y.ravel(), [1 / 6, 2 / 15, 3 / 14])


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
@pytest.mark.parametrize("size", [3, 5])
def test_lrn_gradient(region, size):
    bottom = random_blob((2, 4, 3, 3), seed=2, low=-2, high=2)
    layer, top = make_layer(lrn_text(size, region), [bottom])
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lrn_shape_and_dtype(region, dtype):
    bottom = random_blob((2, 5, 3, 4), dtype=dtype)
    layer, top = make_layer(f'type: "LRN" lrn_param {{ norm_region: {region} }}', [bottom],
                            dtype=dtype)
    layer.forward([bottom], top)
    assert top[0].shape == (2, 5, 3, 4) and top[0].data.dtype == dtype
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    assert bottom.diff.dtype == dtype


@pytest.mark.parametrize("text, shape, match", [
    ('type: "LRN" lrn_param { local_size: 4 }', (1, 3, 2, 2), "must be odd; got 4"),
    ('type: "LRN"', (2, 3, 4), "4 axes"),
])
def test_lrn_errors(text, shape, match):
    with pytest.raises(LayerError, match=match):
        make_layer(text, [random_blob(shape)])


def test_lrn_refuses_in_place():
    bottom = random_blob((1, 3, 2, 2))
    layer = create_layer(layer_param('type: "LRN"'), TRAIN, np.random.default_rng(0),
                         np.float64)
    layer.setup([bottom], [bottom])
    with pytest.raises(LayerError, match="in-place"):
        layer.reshape([bottom], [bottom])


# -- BatchNorm ----------------------------------------------------------------------------------

def bn_layer(x: np.ndarray, text: str = 'type: "BatchNorm"', phase: int = TRAIN):
    bottom = blob_of(x)
    layer, top = make_layer(text, [bottom], phase=phase)
    return layer, bottom, top


@pytest.mark.parametrize("shape, channels", [((2, 3, 4, 5), 3), ((4, 3), 3), ((6,), 1),
                                             ((2, 3, 2, 2, 2), 3)])
def test_batchnorm_blobs_and_shapes(shape, channels):
    layer, bottom, top = bn_layer(np.random.default_rng(0).standard_normal(shape))
    assert [b.shape for b in layer.blobs] == [(channels,), (channels,), (1,)]
    assert all(np.all(b.data == 0) for b in layer.blobs)
    layer.forward([bottom], top)
    assert top[0].shape == shape


def test_batchnorm_training_forward_normalizes_each_channel():
    x = np.random.default_rng(1).normal(3, 2, (4, 3, 2, 5))
    eps = float(np.float32(1e-5))
    layer, bottom, top = bn_layer(x)
    assert not layer.use_global_stats
    layer.forward([bottom], top)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)  # biased
    np.testing.assert_allclose(top[0].data, (x - mean) / np.sqrt(var + eps), rtol=1e-12)


def test_batchnorm_accumulators_over_two_forwards():
    rng = np.random.default_rng(2)
    x1, x2 = rng.normal(1, 2, (3, 2, 4)), rng.normal(-1, 0.5, (3, 2, 4))
    maf = float(np.float32(0.9))
    text = 'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 }'
    layer, bottom, top = bn_layer(x1, text)
    layer.forward([bottom], top)
    bottom.data[...] = x2
    layer.forward([bottom], top)
    m = 3 * 4  # count / C
    stats = [(x.mean(axis=(0, 2)), x.var(axis=(0, 2))) for x in (x1, x2)]
    (mean1, var1), (mean2, var2) = stats
    np.testing.assert_allclose(layer.blobs[2].data, [maf * 1 + 1])
    np.testing.assert_allclose(layer.blobs[0].data, maf * mean1 + mean2, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, m / (m - 1) * (maf * var1 + var2),
                               rtol=1e-12)


def test_batchnorm_global_stats_divide_by_the_normalizer():
    x = np.random.default_rng(3).standard_normal((2, 2, 3))
    eps = float(np.float32(1e-5))
    layer, bottom, top = bn_layer(x, phase=TEST)
    assert layer.use_global_stats
    layer.blobs[0].data[...] = [2.0, -4.0]
    layer.blobs[1].data[...] = [8.0, 0.5]
    layer.blobs[2].data[...] = 2.0
    layer.forward([bottom], top)
    mean = np.array([1.0, -2.0]).reshape(1, 2, 1)
    var = np.array([4.0, 0.25]).reshape(1, 2, 1)
    np.testing.assert_allclose(top[0].data, (x - mean) / np.sqrt(var + eps), rtol=1e-12)
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    np.testing.assert_allclose(bottom.diff, np.broadcast_to(1 / np.sqrt(var + eps), x.shape),
                               rtol=1e-12)
    assert layer.blobs[2].data[0] == 2.0  # global stats never update the accumulators


def test_batchnorm_zero_normalizer_means_zero_statistics():
    x = np.random.default_rng(4).standard_normal((2, 2, 3))
    layer, bottom, top = bn_layer(x, phase=TEST)
    layer.forward([bottom], top)
    np.testing.assert_allclose(top[0].data, x / np.sqrt(float(np.float32(1e-5))), rtol=1e-12)


@pytest.mark.parametrize("phase, given, expected", [
    (TRAIN, "", False), (TEST, "", True),
    (TRAIN, "use_global_stats: true", True), (TEST, "use_global_stats: false", False),
])
def test_batchnorm_use_global_stats_default_is_the_phase(phase, given, expected):
    text = f'type: "BatchNorm" batch_norm_param {{ {given} }}'
    layer, _, _ = bn_layer(np.ones((2, 2)), text, phase)
    assert layer.use_global_stats is expected


@pytest.mark.parametrize("params", ["", "param { lr_mult: 0 }",
                                    "param { lr_mult: 0 } param { lr_mult: 0 decay_mult: 1 } "
                                    "param { lr_mult: 0 }"])
def test_batchnorm_statistics_get_lr_mult_zero(params):
    layer, _, _ = bn_layer(np.ones((2, 2)), f'type: "BatchNorm" {params}')
    assert [spec.lr_mult for spec in layer.param.param] == [0, 0, 0]


def test_batchnorm_learned_statistics_are_an_error():
    with pytest.raises(LayerError, match="param 1 has lr_mult 1"):
        bn_layer(np.ones((2, 2)), 'type: "BatchNorm" param { lr_mult: 0 } param { }')


def test_batchnorm_in_a_net_has_no_learning_rate():
    text = """
      layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
      layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }
    """
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), engine.TRAIN)
    assert net.params_lr == [0, 0, 0]
    assert net.params_weight_decay == [0, 0, 0]
    net.forward(x=np.arange(12.0).reshape(4, 3))
    np.testing.assert_allclose(net.blobs["x"].data.mean(axis=0), 0, atol=1e-6)
    assert net.params["bn"][2].data[0] == 1


@pytest.mark.parametrize("text", ['type: "BatchNorm"',
                                  'type: "BatchNorm" batch_norm_param { eps: 0.1 }'])
@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (4, 3)])
def test_batchnorm_training_gradient(text, shape):
    bottom = random_blob(shape, seed=5, low=-2, high=2)
    layer, top = make_layer(text, [bottom])
    check_gradient(layer, [bottom], top, check_params=False)
    assert all(np.all(b.diff == 0) for b in layer.blobs)  # statistics get no gradient


def test_batchnorm_global_gradient():
    bottom = random_blob((2, 3, 2), seed=6)
    layer, top = make_layer('type: "BatchNorm"', [bottom], phase=TEST)
    layer.blobs[0].data[...] = [0.5, -1, 2]
    layer.blobs[1].data[...] = [1, 2, 3]
    layer.blobs[2].data[...] = 1.5
    check_gradient(layer, [bottom], top, check_params=False)


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batchnorm_in_place_matches_out_of_place(phase):
    x = np.random.default_rng(7).standard_normal((3, 2, 4))
    dy = np.random.default_rng(8).standard_normal(x.shape)
    text = 'type: "BatchNorm" batch_norm_param { use_global_stats: false }'
    y_out, dx_out = run(text, x, dy, False, phase)
    y_in, dx_in = run(text, x, dy, True, phase)
    np.testing.assert_array_equal(y_in, y_out)
    np.testing.assert_array_equal(dx_in, dx_out)


def test_batchnorm_float32_stays_float32():
    bottom = random_blob((4, 3, 2, 2), dtype=np.float32)
    layer, top = make_layer('type: "BatchNorm"', [bottom], dtype=np.float32)
    layer.forward([bottom], top)
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    assert top[0].data.dtype == bottom.diff.dtype == layer.blobs[0].data.dtype == np.float32
    np.testing.assert_allclose(top[0].data.std(axis=(0, 2, 3)), 1, rtol=1e-4)


def test_batchnorm_rejects_other_channel_count():
    layer, _, top = bn_layer(np.ones((2, 3, 2)))
    with pytest.raises(LayerError, match="3 channels"):
        layer.reshape([blob_of(np.ones((2, 4, 2)))], top)


# -- MVN ----------------------------------------------------------------------------------------

def mvn_reference(x: np.ndarray, normalize_variance: bool, across_channels: bool,
                  eps: float) -> np.ndarray:
    y = np.empty_like(x)
    groups = [(n,) for n in range(x.shape[0])] if across_channels else list(
        np.ndindex(x.shape[:2]))
    for g in groups:
        values = x[g]
        centred = values - values.mean()
        if normalize_variance:
            centred = centred / (np.sqrt((centred**2).mean()) + eps)
        y[g] = centred
    return y


MVN_CASES = [(nv, ac) for nv in (True, False) for ac in (False, True)]


def mvn_text(nv: bool, ac: bool, eps: str = "") -> str:
    return (f'type: "MVN" mvn_param {{ normalize_variance: {str(nv).lower()} '
            f'across_channels: {str(ac).lower()} {eps} }}')


@pytest.mark.parametrize("nv, ac", MVN_CASES)
@pytest.mark.parametrize("shape", [(2, 3, 2, 4), (3, 2, 5)])
def test_mvn_forward_matches_per_group_reference(nv, ac, shape):
    x = np.random.default_rng(9).normal(2, 3, shape)
    y, _ = run(mvn_text(nv, ac), x, x, False)
    expected = mvn_reference(x, nv, ac, float(np.float32(1e-9)))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-14)


def test_mvn_eps_is_added_after_the_square_root():
    x = np.array([1.0, 3.0, 1.0, 3.0]).reshape(1, 1, 4)  # mean 2, std 1
    y, _ = run(mvn_text(True, False, "eps: 1"), x, x, False)
    np.testing.assert_allclose(y.ravel(), [-0.5, 0.5, -0.5, 0.5])  # /(1 + 1), not /sqrt(1 + 1)
    y, _ = run(mvn_text(True, False), np.full((1, 1, 3), 5.0), x[..., :3], False)
    np.testing.assert_array_equal(y, 0)  # a constant plane: 0 / (0 + eps)


@pytest.mark.parametrize("nv, ac", MVN_CASES)
def test_mvn_gradient(nv, ac):
    bottom = random_blob((2, 3, 2, 2), seed=10, low=-2, high=2)
    layer, top = make_layer(mvn_text(nv, ac), [bottom])
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize("nv, ac", MVN_CASES)
def test_mvn_in_place_matches_out_of_place(nv, ac):
    x = np.random.default_rng(11).standard_normal((2, 3, 5))
    dy = np.random.default_rng(12).standard_normal(x.shape)
    y_out, dx_out = run(mvn_text(nv, ac), x, dy, False)
    y_in, dx_in = run(mvn_text(nv, ac), x, dy, True)
    np.testing.assert_array_equal(y_in, y_out)
    np.testing.assert_array_equal(dx_in, dx_out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mvn_shape_and_dtype(dtype):
    bottom = random_blob((2, 3, 4, 5), dtype=dtype)
    layer, top = make_layer('type: "MVN"', [bottom], dtype=dtype)
    layer.forward([bottom], top)
    top[0].diff[...] = 1
    layer.backward(top, [True], [bottom])
    assert top[0].shape == (2, 3, 4, 5)
    assert top[0].data.dtype == bottom.diff.dtype == dtype


def test_resnet_style_in_place_chain_gradient():
    # conv-free ResNet block tail: BatchNorm, Scale and PReLU all in place on one blob
    text = """
      force_backward: true
      layer { name: "in" type: "Input" top: "x" top: "t"
              input_param { shape { dim: 4 dim: 3 dim: 2 } shape { dim: 4 dim: 3 dim: 2 } } }
      layer { name: "ip" type: "Power" bottom: "x" top: "h" power_param { scale: 1.5 } }
      layer { name: "bn" type: "BatchNorm" bottom: "h" top: "h" }
      layer { name: "sc" type: "Scale" bottom: "h" top: "h" scale_param { bias_term: true
              filler { type: "uniform" min: 0.5 max: 2 } bias_filler { type: "uniform" } } }
      layer { name: "act" type: "PReLU" bottom: "h" top: "h" }
      layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "t" top: "loss" }
    """
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), engine.TRAIN,
              rng=np.random.default_rng(0), dtype=np.float64)
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 3, 2))

    def loss(values: np.ndarray) -> float:
        return float(net.forward(x=values, t=t)["loss"])

    loss(x)
    dx = net.backward()["x"].copy()
    assert np.abs(dx).max() > 1e-2
    step = 1e-5
    for index in [(0, 0, 0), (1, 2, 1), (3, 1, 0), (2, 0, 1)]:
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        numeric = (loss(plus) - loss(minus)) / (2 * step)
        assert dx[index] == pytest.approx(numeric, rel=1e-5, abs=1e-8)
