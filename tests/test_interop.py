"""Interoperability: Moka's .caffemodel files in another Caffe reader, Caffe-era files in Moka.

- OpenCV's dnn module (``cv2.dnn.readNetFromCaffe``) reads the weights Moka writes and computes
  the same outputs, blob by blob.
- Files written the ways Caffe wrote them over its history (legacy num/channels/height/width
  shapes, ``shape { dim }``, V1 ``layers``, double data) load in Moka and compute what numpy
  computes with those weights.
- Saving and loading is lossless, with and without diffs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import caffe_pb2
from engine.blob import Blob
from engine.errors import MokaError
from engine.io import read_net_binary, read_net_param, write_binary

# -- nets ------------------------------------------------------------------------------------
# Caffe's examples/mnist/lenet deploy net (with a batch of 4).
LENET = """
name: "LeNet"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 4 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 20 kernel_size: 5 stride: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 50 kernel_size: 5 stride: 1 } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param { num_output: 500 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""

# More of what OpenCV reads: legacy input fields, grouped/strided/padded/rectangular
# convolutions, AVE pooling whose last window overhangs (ceil), padded MAX and AVE pooling,
# branches joined by Concat and Eltwise (SUM with coefficients, PROD), Sigmoid, TanH, leaky
# ReLU, Dropout (identity at TEST, in place), Flatten and Reshape.
ZOO = """
name: "zoo"
input: "data"
input_shape { dim: 2 dim: 4 dim: 11 dim: 11 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "data" top: "conv2"
        convolution_param { num_output: 6 kernel_h: 5 kernel_w: 1 pad_h: 2 pad_w: 0
                            stride: 2 bias_term: false } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum"
        eltwise_param { operation: SUM coeff: 0.5 coeff: -1.5 } }
layer { name: "tanh" type: "TanH" bottom: "sum" top: "tanh" }
layer { name: "sig" type: "Sigmoid" bottom: "conv1" top: "sig" }
layer { name: "cat" type: "Concat" bottom: "tanh" bottom: "sig" top: "cat"
        concat_param { axis: 1 } }
layer { name: "ave" type: "Pooling" bottom: "cat" top: "ave"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "ave_pad" type: "Pooling" bottom: "cat" top: "ave_pad"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "max_pad" type: "Pooling" bottom: "cat" top: "max_pad"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "prod" type: "Eltwise" bottom: "ave_pad" bottom: "max_pad" top: "prod"
        eltwise_param { operation: PROD } }
layer { name: "drop" type: "Dropout" bottom: "prod" top: "prod"
        dropout_param { dropout_ratio: 0.3 } }
layer { name: "flat" type: "Flatten" bottom: "prod" top: "flat" }
layer { name: "reshape" type: "Reshape" bottom: "ave" top: "reshape"
        reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "join" type: "Concat" bottom: "flat" bottom: "reshape" top: "join" }
layer { name: "ip1" type: "InnerProduct" bottom: "join" top: "ip1"
        inner_product_param { num_output: 7 } }
layer { name: "leaky" type: "ReLU" bottom: "ip1" top: "leaky"
        relu_param { negative_slope: 0.1 } }
layer { name: "ip2" type: "InnerProduct" bottom: "leaky" top: "ip2"
        inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""

# Shapes the ZOO blobs must have (Caffe's arithmetic, worked by hand): the 6x6 maps pool to
# 3x3 with the last window overhanging by one, and to 4x4 when padded.
ZOO_SHAPES = {
    "conv1": (2, 6, 6, 6), "conv2": (2, 6, 6, 6), "cat": (2, 12, 6, 6),
    "ave": (2, 12, 3, 3), "ave_pad": (2, 12, 4, 4), "max_pad": (2, 12, 4, 4),
    "flat": (2, 192), "reshape": (2, 108), "join": (2, 300), "prob": (2, 5),
}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def randomize(net: engine.Net, seed: int) -> None:
    """Non-trivial weights: ~unit-variance outputs for weights, visible biases."""
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for blob in blobs:
            fan_in = math.prod(blob.shape[1:])
            if blob.data.ndim > 1:
                blob.data[...] = rng.standard_normal(blob.shape) / math.sqrt(fan_in)
            else:
                blob.data[...] = rng.uniform(-0.5, 0.5, blob.shape)


def last_writers(net: engine.Net) -> dict[str, str]:
    """For each prototxt blob, the layer whose output it finally holds (in-place aware)."""
    writers = {}
    for layer in net.layers:
        if layer.type == "Split":
            continue
        for top in net.top_names[layer.name]:
            writers[top] = layer.name
    return writers


# -- a. OpenCV reads what Moka writes ----------------------------------------------------------
@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless<5, the test "
                               "extra) is not installed: cannot check its Caffe reader")


@pytest.mark.parametrize(("text", "seed"), [(LENET, 1), (ZOO, 2)], ids=["lenet", "zoo"])
def test_opencv_reads_moka_caffemodel(cv2, tmp_path, text, seed):
    prototxt = write(tmp_path, "deploy.prototxt", text)
    model = str(tmp_path / "weights.caffemodel")
    net = engine.Net(prototxt, engine.TEST)
    randomize(net, seed)
    net.save(model)

    x = np.random.default_rng(seed + 100).uniform(-1, 1, net.blobs["data"].shape)
    x = x.astype(np.float32)
    net.forward(data=x)
    writers = last_writers(net)
    names = [n for n in writers if n != "data"]

    reader = cv2.dnn.readNetFromCaffe(prototxt, model)
    reader.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    reader.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    reader.enableFusion(False)  # so each layer's output is its own, comparable blob by blob
    reader.setInput(x, "data")
    outputs = reader.forward([writers[n] for n in names])

    assert len(outputs) == len(names)
    for name, theirs in zip(names, outputs, strict=True):
        ours = net.blobs[name].data
        assert theirs.shape == ours.shape, name
        scale = max(1.0, float(np.abs(ours).max()))
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * scale, err_msg=name)
    assert np.ptp(net.blobs["prob"].data) > 0.05  # the weights did something

    fused = cv2.dnn.readNetFromCaffe(prototxt, model)  # as users run it: layers fused
    fused.setInput(x, "data")
    np.testing.assert_allclose(fused.forward(), net.blobs["prob"].data, rtol=1e-4, atol=1e-5)


def test_zoo_shapes_are_caffes():
    net = engine.Net(read_net_param(ZOO, is_text=True), engine.TEST)
    for name, shape in ZOO_SHAPES.items():
        assert net.blobs[name].shape == shape, name


# -- b. Files written the ways Caffe wrote them load in Moka -----------------------------------
SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2"
        inner_product_param { num_output: 3 } }
"""


def small_weights(seed: int = 7) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "conv": [rng.standard_normal((4, 3, 3, 3)) / 5, rng.uniform(-1, 1, 4)],
        "ip": [rng.standard_normal((5, 36)) / 6, rng.uniform(-1, 1, 5)],
        "ip2": [rng.standard_normal((3, 5)) / 2, rng.uniform(-1, 1, 3)],
    }


def small_reference(x: np.ndarray, w: dict[str, list[np.ndarray]]) -> np.ndarray:
    """The SMALL net in float64 numpy: a naive valid cross-correlation, then two products."""
    weight, bias = w["conv"]
    n, _, h, wd = x.shape
    out = np.zeros((n, 4, h - 2, wd - 2))
    for i in range(h - 2):
        for j in range(wd - 2):
            patch = x[:, :, i:i + 3, j:j + 3]
            out[:, :, i, j] = np.einsum("nckl,ockl->no", patch, weight) + bias
    hidden = np.maximum(out.reshape(n, -1) @ w["ip"][0].T + w["ip"][1], 0)
    return hidden @ w["ip2"][0].T + w["ip2"][1]


def legacy_blob(proto, array: np.ndarray) -> None:
    """num/channels/height/width, dims aligned to the end: 1x1xMxK weights, 1x1x1xN biases."""
    dims = (1,) * (4 - array.ndim) + array.shape
    proto.num, proto.channels, proto.height, proto.width = dims
    proto.data.extend(array.astype(np.float32).ravel().tolist())


def shaped_blob(proto, array: np.ndarray, double: bool = False) -> None:
    proto.shape.dim.extend(array.shape)
    values = array.ravel().tolist()
    if double:
        proto.double_data.extend(values)
    else:
        proto.data.extend(array.astype(np.float32).ravel().tolist())


def current_caffemodel(w: dict[str, list[np.ndarray]]) -> caffe_pb2.NetParameter:
    """Legacy 4-d blobs for conv and ip (Caffe before 2015), ``shape`` and double for ip2."""
    net = caffe_pb2.NetParameter()
    net.name = "small"
    data = net.layer.add()
    data.name, data.type = "data", "Input"
    data.top.append("data")
    for name, kind, bottom, n_out in (("conv", "Convolution", "data", 4),
                                      ("ip", "InnerProduct", "conv", 5),
                                      ("ip2", "InnerProduct", "ip", 3)):
        layer = net.layer.add()
        layer.name, layer.type = name, kind
        layer.bottom.append(bottom)
        layer.top.append(name)
        if kind == "Convolution":
            layer.convolution_param.num_output = n_out
            layer.convolution_param.kernel_size.append(3)
        else:
            layer.inner_product_param.num_output = n_out
        weight, bias = w[name]
        if name == "ip2":
            shaped_blob(layer.blobs.add(), weight)
            shaped_blob(layer.blobs.add(), bias, double=True)
        else:
            legacy_blob(layer.blobs.add(), weight)
            legacy_blob(layer.blobs.add(), bias)
    unused = net.layer.add()  # a layer the target net lacks is ignored, as in Caffe
    unused.name, unused.type = "fc_old", "InnerProduct"
    shaped_blob(unused.blobs.add(), np.ones((2, 2)))
    return net


def v1_caffemodel(w: dict[str, list[np.ndarray]]) -> caffe_pb2.NetParameter:
    """The same weights in V1 ``layers`` with enum types (Caffe 2014), legacy 4-d blobs."""
    net = caffe_pb2.NetParameter()
    net.name = "small"
    kinds = {"conv": caffe_pb2.V1LayerParameter.CONVOLUTION,
             "ip": caffe_pb2.V1LayerParameter.INNER_PRODUCT,
             "ip2": caffe_pb2.V1LayerParameter.INNER_PRODUCT}
    bottoms = {"conv": "data", "ip": "conv", "ip2": "ip"}
    for name, kind in kinds.items():
        layer = net.layers.add()
        layer.name, layer.type = name, kind
        layer.bottom.append(bottoms[name])
        layer.top.append(name)
        layer.blobs_lr.extend([1, 2])
        if name == "conv":
            layer.convolution_param.num_output = 4
            layer.convolution_param.kernel_size.append(3)
        else:
            layer.inner_product_param.num_output = w[name][0].shape[0]
        for array in w[name]:
            legacy_blob(layer.blobs.add(), array)
    relu = net.layers.add()
    relu.name, relu.type = "relu", caffe_pb2.V1LayerParameter.RELU
    relu.bottom.append("ip")
    relu.top.append("ip")
    return net


@pytest.mark.parametrize("build", [current_caffemodel, v1_caffemodel], ids=["layer", "v1"])
def test_caffe_written_caffemodel_loads(tmp_path, build):
    w = small_weights()
    model = str(tmp_path / "small.caffemodel")
    write_binary(build(w), model)
    prototxt = write(tmp_path, "small.prototxt", SMALL)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 5, 5))
    expected = small_reference(x, w)

    by_constructor = engine.Net(prototxt, engine.TEST, weights=model)
    by_copy = engine.Net(prototxt, engine.TEST)
    by_copy.copy_from(model)
    by_message = engine.Net(prototxt, engine.TEST)
    by_message.copy_from(read_net_binary(model))
    for net in (by_constructor, by_copy, by_message):
        for name, arrays in w.items():
            for blob, array in zip(net.params[name], arrays, strict=True):
                np.testing.assert_array_equal(blob.data, array.astype(np.float32))
        out = net.forward(data=x.astype(np.float32))["ip2"]
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_legacy_blob_of_wrong_shape_is_refused(tmp_path):
    w = small_weights()
    w["ip"][0] = w["ip"][0].reshape(6, 30)  # same count, different shape
    model = str(tmp_path / "bad.caffemodel")
    write_binary(current_caffemodel(w), model)
    net = engine.Net(write(tmp_path, "small.prototxt", SMALL), engine.TEST)
    with pytest.raises(MokaError, match=r"ip.*shape mismatch"):
        net.copy_from(model)


# -- c. Round trips ------------------------------------------------------------------------------
TRAIN_NET = LENET.replace('name: "prob" type: "Softmax" bottom: "ip2" top: "prob"',
                          'name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" '
                          'top: "loss"').replace(
    "input_param { shape { dim: 4 dim: 1 dim: 28 dim: 28 } }",
    'top: "label" input_param { shape { dim: 4 dim: 1 dim: 28 dim: 28 } shape { dim: 4 } }')


def assert_same_params(a: engine.Net, b: engine.Net) -> None:
    assert list(a.params) == list(b.params)
    for name in a.params:
        for x, y in zip(a.params[name], b.params[name], strict=True):
            assert x.data.dtype == y.data.dtype
            assert x.data.tobytes() == y.data.tobytes(), name


def test_round_trip_is_bit_exact(tmp_path):
    prototxt = write(tmp_path, "lenet.prototxt", LENET)
    net = engine.Net(prototxt, engine.TEST, rng=np.random.default_rng(5))
    randomize(net, 5)
    net.params["ip1"][1].data[:3] = [np.float32(1e-38), -0.0, np.float32(3.4e38)]
    model = str(tmp_path / "a.caffemodel")
    net.save(model)
    again = engine.Net(prototxt, engine.TEST, weights=model)
    assert_same_params(net, again)

    again.save(str(tmp_path / "b.caffemodel"))  # a second generation writes the same bytes
    assert (tmp_path / "a.caffemodel").read_bytes() == (tmp_path / "b.caffemodel").read_bytes()

    saved = read_net_binary(model)
    conv1 = next(layer for layer in saved.layer if layer.name == "conv1")
    assert list(conv1.blobs[0].shape.dim) == [20, 1, 5, 5]
    assert not len(conv1.blobs[0].diff)


def test_round_trip_with_diff(tmp_path):
    prototxt = write(tmp_path, "train.prototxt", TRAIN_NET)
    net = engine.Net(prototxt, engine.TRAIN)
    randomize(net, 6)
    rng = np.random.default_rng(6)
    net.forward(data=rng.uniform(-1, 1, (4, 1, 28, 28)), label=rng.integers(0, 10, 4))
    net.backward()
    model = str(tmp_path / "with_diff.caffemodel")
    net.save(model, write_diff=True)

    saved = {layer.name: layer for layer in read_net_binary(model).layer}
    for name, blobs in net.params.items():
        assert len(saved[name].blobs) == len(blobs)
        for proto, blob in zip(saved[name].blobs, blobs, strict=True):
            loaded = Blob.from_proto(proto)
            assert loaded.data.tobytes() == blob.data.tobytes(), name
            assert loaded.diff.tobytes() == blob.diff.tobytes(), name
            assert np.any(blob.diff != 0), name

    # The TRAIN snapshot, diffs and loss layers included, fine-tunes a deploy net by name.
    deploy = engine.Net(write(tmp_path, "deploy.prototxt", LENET), engine.TEST, weights=model)
    assert_same_params(net, deploy)


def test_float64_net_writes_double_data(tmp_path):
    prototxt = write(tmp_path, "small.prototxt", SMALL)
    net = engine.Net(prototxt, engine.TEST, dtype=np.float64, rng=np.random.default_rng(8))
    model = str(tmp_path / "double.caffemodel")
    net.save(model)
    saved = {layer.name: layer for layer in read_net_binary(model).layer}
    assert len(saved["ip"].blobs[0].double_data) == 5 * 36
    assert not len(saved["ip"].blobs[0].data)

    same = engine.Net(prototxt, engine.TEST, weights=model, dtype=np.float64)
    assert_same_params(net, same)
    single = engine.Net(prototxt, engine.TEST, weights=model)
    for name, blobs in net.params.items():
        for blob, got in zip(blobs, single.params[name], strict=True):
            np.testing.assert_array_equal(got.data, blob.data.astype(np.float32))
