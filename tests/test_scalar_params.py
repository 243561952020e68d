"""Scalar parameters in .caffemodel files: Caffe writes a 0-axis blob (PReLU ``channel_shared``,
Scale and Bias with ``num_axes: 0``) as a BlobProto with no shape field and one value. Such files
load, and Moka writes its own scalars the same way."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import caffe_pb2
from engine.blob import Blob, blob_proto_shape, legacy_shape_matches
from engine.errors import MokaError
from engine.io import read_net_binary, write_binary

NET = """
name: "scalars"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 2 } } }
layer { name: "prelu" type: "PReLU" bottom: "data" top: "a"
        prelu_param { channel_shared: true } }
layer { name: "scale" type: "Scale" bottom: "a" top: "b"
        scale_param { num_axes: 0 bias_term: true } }
layer { name: "bias" type: "Bias" bottom: "b" top: "c" bias_param { num_axes: 0 } }
"""
VALUES = {"prelu": [0.3], "scale": [-1.5, 0.25], "bias": [2.0]}


def caffe_written(values: dict[str, list[float]]) -> caffe_pb2.NetParameter:
    """The layout Caffe's Blob::ToProto gives a 0-axis blob: no shape, one float in data."""
    net = caffe_pb2.NetParameter()
    net.name = "scalars"
    for name, kind in (("prelu", "PReLU"), ("scale", "Scale"), ("bias", "Bias")):
        layer = net.layer.add()
        layer.name, layer.type = name, kind
        for value in values[name]:
            blob = layer.blobs.add()
            blob.data.append(value)
    return net


def reference(x: np.ndarray, v: dict[str, list[float]]) -> np.ndarray:
    a = np.where(x > 0, x, v["prelu"][0] * x)
    b = a * v["scale"][0] + v["scale"][1]
    return b + v["bias"][0]


@pytest.fixture
def prototxt(tmp_path):
    path = tmp_path / "scalars.prototxt"
    path.write_text(NET)
    return str(path)


def test_caffe_written_scalar_parameters_load(tmp_path, prototxt):
    model = tmp_path / "caffe.caffemodel"
    write_binary(caffe_written(VALUES), model)
    for blob in read_net_binary(model).layer[0].blobs:
        assert not blob.HasField("shape")  # really the layout Caffe writes
    net = engine.Net(prototxt, engine.TEST, weights=str(model))
    for name, values in VALUES.items():
        for blob, value in zip(net.params[name], values, strict=True):
            assert blob.shape == ()
            assert blob.data == np.float32(value)
    x = np.random.default_rng(0).standard_normal((2, 3, 2)).astype(np.float32)
    out = net.forward(data=x)["c"]
    np.testing.assert_allclose(out, reference(x, VALUES), rtol=1e-6)


def test_moka_writes_scalars_as_caffe_does(tmp_path, prototxt):
    net = engine.Net(prototxt, engine.TEST)
    net.params["prelu"][0].data[...] = 0.125
    model = tmp_path / "moka.caffemodel"
    net.save(str(model))
    written = {layer.name: layer for layer in read_net_binary(model).layer}
    scalar = written["prelu"].blobs[0]
    assert not scalar.HasField("shape")
    assert list(scalar.data) == [0.125]
    assert scalar.SerializeToString() == caffe_written({**VALUES, "prelu": [0.125]}
                                                       ).layer[0].blobs[0].SerializeToString()
    again = engine.Net(prototxt, engine.TEST, weights=str(model))
    assert again.params["prelu"][0].data == np.float32(0.125)


def test_dimless_proto_shapes():
    one, several = caffe_pb2.BlobProto(), caffe_pb2.BlobProto()
    one.data.append(1.0)
    several.data.extend([1.0, 2.0, 3.0])
    assert blob_proto_shape(one) == ()
    assert legacy_shape_matches(one, ())
    assert not legacy_shape_matches(one, (1,))
    assert blob_proto_shape(several) == (3,)
    assert Blob.from_proto(one).shape == ()


def test_a_vector_is_still_refused_for_a_scalar_parameter(tmp_path, prototxt):
    bad = caffe_written(VALUES)
    bad.layer[0].blobs[0].data.append(0.5)  # two slopes where the net has one
    bad.layer[0].blobs[0].shape.dim.append(2)
    model = tmp_path / "bad.caffemodel"
    write_binary(bad, model)
    with pytest.raises(MokaError, match=r"prelu.*shape mismatch.*\(2,\).*\(\)"):
        engine.Net(prototxt, engine.TEST, weights=str(model))
