"""caffe.coord_map as the FCN examples use it: conv/pool, then deconv, then crop to the input."""

from __future__ import annotations

import numpy as np
import pytest

import engine as caffe
from engine import layers as L
from engine import params as P
from engine.coord_map import (
    AxisMismatchException,
    UndefinedMapException,
    compose,
    coord_map,
    coord_map_from_to,
    crop,
    inverse,
)


def fcn(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0, size=100) -> caffe.NetSpec:
    """Input → conv → max pool → deconv (kernel twice its stride), as FCN's upsampling."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, size, size]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=3, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    dks = [2 * s for s in dstride] if isinstance(dstride, list) else 2 * dstride
    n.deconv = L.Deconvolution(n.pool, num_output=3, kernel_size=dks, stride=dstride, pad=dpad)
    return n


def test_single_layer_maps():
    x = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    conv = L.Convolution(x, num_output=1, kernel_size=5, stride=2, pad=1)
    axis, a, b = coord_map(conv.fn)
    assert axis == 1 and a == 0.5 and b == (1 - 2) / 2
    dilated = L.Convolution(x, num_output=1, kernel_size=3, dilation=2, pad=2)
    assert coord_map(dilated.fn)[2] == 0          # effective kernel 5, pad 2: centred
    deconv = L.Deconvolution(x, convolution_param=dict(num_output=1, kernel_size=4, stride=2))
    assert coord_map(deconv.fn)[1:] == (2, 1.5)
    pool = L.Pooling(x, kernel_h=2, kernel_w=4, stride_h=2, stride_w=4)
    _, a, b = coord_map(pool.fn)
    assert list(a) == [0.5, 0.25] and list(b) == [-0.25, -0.375]
    assert coord_map(L.ReLU(x).fn) == (None, 1, 0)
    axis, a, b = coord_map(L.Crop(x, x, axis=2, offset=[3, 4]).fn)
    assert axis == 1 and a == 1 and list(b) == [-3, -4]
    with pytest.raises(UndefinedMapException):
        coord_map(L.InnerProduct(x, num_output=2).fn)
    with pytest.raises(UndefinedMapException):
        coord_map(L.Pooling(x, global_pooling=True).fn)


def test_compose_and_inverse():
    m = (1, np.array([0.5]), np.array([-0.25]))
    axis, a, b = compose(m, inverse(m))
    assert axis == 1 and a == 1 and b == 0
    assert compose((None, 1, 0), m)[0] == 1 and compose(m, (None, 1, 0))[0] == 1
    assert compose((None, 2, 1), (None, 3, 4)) == (None, 6, 9)   # 2 * (3x + 4) + 1
    with pytest.raises(AxisMismatchException):
        compose((1, 1, 0), (2, 1, 0))


def test_conv_pool_deconv():
    n = fcn()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert (ax, a, b) == (1, 1, 0)                  # 2x pool undone by 2x deconv
    n = fcn(pool=4, dstride=4)
    assert coord_map_from_to(n.deconv, n.data) == (1, 1, -1)


def test_padding_shifts_and_cancels():
    n = fcn()
    _, a, b = coord_map_from_to(n.deconv, n.data)
    for pad in (1, 7):
        n = fcn(pad=pad)
        assert coord_map_from_to(n.deconv, n.data)[1:] == (a, b - pad)
        n = fcn(dpad=pad)
        assert coord_map_from_to(n.deconv, n.data)[1:] == (a, b + pad)
        n = fcn(pad=pad, dpad=pad)
        assert coord_map_from_to(n.deconv, n.data)[1:] == (a, b)


def test_pointwise_and_1x1_layers_keep_the_map():
    n = fcn()
    base = coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=3, kernel_size=1)
    for top in (n.relu, n.conv1x1):
        assert coord_map_from_to(top, n.data) == base


def test_every_bottom_and_top_of_a_layer_map_alike():
    n = fcn()
    n.conv_data, n.conv_aux = L.Convolution(n.data, n.aux, ntop=2, num_output=3, kernel_size=5,
                                            stride=2)
    assert coord_map_from_to(n.conv_data, n.data) == coord_map_from_to(n.conv_aux, n.aux)


def test_anisotropic_and_nd():
    square3 = fcn(ks=3, stride=1, pad=0)
    square5 = fcn(ks=5, stride=2, pad=10)
    rect = fcn(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    _, a3, b3 = coord_map_from_to(square3.deconv, square3.data)
    _, a5, b5 = coord_map_from_to(square5.deconv, square5.data)
    _, ar, br = coord_map_from_to(rect.deconv, rect.data)
    assert list(ar) == [a3[0], a5[0]] and list(br) == [b3[0], b5[0]]

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 40, 40, 40]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=[3, 3, 3], pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.deconv = L.Deconvolution(n.pool, num_output=2, kernel_size=4, stride=2)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and np.all(a == 1) and list(b) == [0, -1, -2]


def test_crop_of_a_crop_adds_its_offset():
    n = fcn()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    for offset in (0, 3):
        n.crop = L.Crop(n.deconv, n.data, axis=2, offset=offset)
        assert coord_map_from_to(n.crop, n.data) == (ax, a, b + offset)


def test_fcn_crop_aligns_the_upsampled_scores_with_the_input(tmp_path):
    """FCN's pattern: pad 100 at the first conv, score, upsample, crop back to the input."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 20, 20]))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=100,
                            weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.score = L.Convolution(n.pool1, num_output=2, kernel_size=1)
    n.upscore = L.Deconvolution(n.score, convolution_param=dict(
        num_output=2, kernel_size=4, stride=2, bias_term=False))
    assert coord_map_from_to(n.upscore, n.data) == (1, 1, -100)
    n.score_crop = crop(n.upscore, n.data)
    proto = n.to_proto()
    layer = proto.layer[-1]
    assert (layer.name, layer.type, list(layer.bottom)) == (
        "score_crop", "Crop", ["upscore", "data"])
    assert layer.crop_param.axis == 2 and list(layer.crop_param.offset) == [100]

    path = tmp_path / "fcn.prototxt"
    path.write_text(str(proto))
    net = caffe.Net(str(path), caffe.TEST)
    assert net.blobs["upscore"].data.shape == (1, 2, 220, 220)
    # The crop keeps the window the mapping names: 220 = 100 + 20 + 100, centred.
    net.blobs["data"].data[...] = np.random.default_rng(0).standard_normal((1, 1, 20, 20))
    out = net.forward()
    np.testing.assert_array_equal(out["score_crop"],
                                  net.blobs["upscore"].data[:, :, 100:120, 100:120])


def test_crop_refuses_what_cannot_align():
    n = fcn()
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError, match="connected by spatial layers"):
        coord_map_from_to(n.ip, n.data)
    n = fcn(pool=3, dstride=2)
    with pytest.raises(AssertionError, match="scale mismatch"):
        crop(n.deconv, n.data)
    n = fcn(dpad=10)
    with pytest.raises(AssertionError, match="negative offset"):
        crop(n.deconv, n.data)
    n = fcn(ks=2)
    with pytest.raises(AssertionError, match="noninteger offset"):
        crop(n.deconv, n.data)
    with pytest.raises(caffe.MokaError):
        crop(n.deconv, n.data)


def test_the_forks_depthwise_and_pointwise_layers_map():
    """A MobileNet/SegNet-style FCN written with the forks' types crops as the plain one."""
    n = fcn()
    expected = coord_map_from_to(n.deconv, n.data)
    m = caffe.NetSpec()
    m.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    m.conv = L.ConvolutionDepthwise(m.data, num_output=1, kernel_size=3)
    m.bn = L.BN(m.conv)
    m.relu = L.ReLU6(m.bn)
    m.shuffle = L.ShuffleChannel(m.relu, shuffle_channel_param=dict(group=1))
    m.pool = L.Pooling(m.shuffle, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    m.dw = L.DepthwiseConvolution(m.pool, num_output=1, kernel_size=1)
    m.deconv = L.Deconvolution(m.dw, num_output=3, kernel_size=4, stride=2)
    assert coord_map_from_to(m.deconv, m.data) == expected
