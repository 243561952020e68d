"""engine/caffe_pb2.py on whatever protobuf runtime is installed (CI runs this on the oldest and
the newest that pyproject.toml allows): the schema module, a net built and its .caffemodel and
prototxt round trips."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor

import engine
from engine import caffe_pb2
from engine.protobuf_compat import EnumWrapper, is_packed, is_repeated, is_required

REPO = Path(__file__).resolve().parents[1]
LENET = REPO / "models" / "lenet"


def test_module_layout_matches_protoc_gencode():
    assert caffe_pb2.DESCRIPTOR.name == "caffe.proto"
    assert caffe_pb2.DESCRIPTOR.package == "caffe"
    assert caffe_pb2.NetParameter.DESCRIPTOR.full_name == "caffe.NetParameter"
    assert caffe_pb2.NetParameter.__module__ == "engine.caffe_pb2"
    # nested enums through the message class, top-level ones through the module
    assert caffe_pb2.PoolingParameter.AVE == 1
    assert caffe_pb2.PoolingParameter.PoolMethod.Name(2) == "STOCHASTIC"
    assert caffe_pb2.Phase.Value("TEST") == caffe_pb2.TEST == 1
    assert caffe_pb2.Phase.Name(caffe_pb2.TRAIN) == "TRAIN"
    assert caffe_pb2.Phase.keys() == ["TRAIN", "TEST"]
    assert caffe_pb2.Phase.items() == [("TRAIN", 0), ("TEST", 1)]
    with pytest.raises(ValueError, match="no value defined for name 'VAL'"):
        caffe_pb2.Phase.Value("VAL")
    with pytest.raises(ValueError, match="no name defined for value 7"):
        caffe_pb2.Phase.Name(7)
    assert isinstance(caffe_pb2.Phase, EnumWrapper)


def test_float_defaults_are_float32_on_every_runtime():
    """Caffe reads float fields as float32; the pure-Python runtime needs its defaults rounded."""
    assert caffe_pb2.BatchNormParameter().eps == float(np.float32(1e-5)) != 1e-5
    assert caffe_pb2.SolverParameter().delta == float(np.float32(1e-8))
    assert caffe_pb2.SolverParameter().momentum2 == float(np.float32(0.999))
    assert caffe_pb2.LRNParameter().beta == 0.75  # exact in float32 anyway
    assert caffe_pb2.BatchNormParameter(eps=0.1).eps == float(np.float32(0.1))


def test_messages_pickle_by_module_path():
    net = caffe_pb2.NetParameter(name="n")
    net.layer.add(name="pool", type="Pooling").pooling_param.pool = caffe_pb2.PoolingParameter.AVE
    again = pickle.loads(pickle.dumps(net))
    assert type(again) is caffe_pb2.NetParameter
    assert again == net


def test_field_queries_fall_back_to_label_on_old_runtimes():
    def old(label, packed=False):
        options = SimpleNamespace(packed=packed)
        return SimpleNamespace(label=label, GetOptions=lambda: options)

    assert is_repeated(old(FieldDescriptor.LABEL_REPEATED))
    assert not is_repeated(old(FieldDescriptor.LABEL_OPTIONAL))
    assert is_required(old(FieldDescriptor.LABEL_REQUIRED))
    assert not is_required(old(FieldDescriptor.LABEL_REPEATED))
    assert is_packed(old(FieldDescriptor.LABEL_REPEATED, packed=True))
    assert not is_packed(old(FieldDescriptor.LABEL_REPEATED))
    assert not is_packed(old(FieldDescriptor.LABEL_OPTIONAL, packed=True))
    real = caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name
    assert is_packed(real["data"]) and is_repeated(real["data"]) and not is_packed(real["num"])


def test_coexists_with_another_caffe_proto_in_the_default_pool():
    """BVLC pycaffe's own caffe_pb2 registers caffe.proto in protobuf's default pool; Moka's
    schema lives in a private pool, so both import in one process."""
    code = """
from google.protobuf import descriptor_pb2, descriptor_pool
other = descriptor_pb2.FileDescriptorProto(name="caffe.proto", package="caffe")
other.message_type.add(name="NetParameter").field.add(
    name="name", number=1, type=9, label=1)
descriptor_pool.Default().Add(other)
from engine import caffe_pb2
net = caffe_pb2.NetParameter(name="x")
net.layer.add(name="a")
print(net.layer[0].name, caffe_pb2.LayerParameter.DESCRIPTOR.file.pool is descriptor_pool.Default())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["a", "False"]


def test_lenet_prototxt_round_trips_through_text():
    text = (LENET / "lenet_train_test.prototxt").read_text()
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    assert [layer.type for layer in net.layer][:3] == ["Data", "Data", "Convolution"]
    assert net.layer[0].include[0].phase == caffe_pb2.TRAIN
    again = text_format.Parse(text_format.MessageToString(net), caffe_pb2.NetParameter())
    assert again == net
    assert caffe_pb2.NetParameter.FromString(net.SerializeToString()) == net


def test_lenet_builds_and_its_caffemodel_round_trips(tmp_path):
    net = engine.Net(str(LENET / "lenet.prototxt"), engine.TEST)
    rng = np.random.default_rng(3)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.standard_normal(blob.data.shape)
    net.blobs["data"].data[...] = rng.random(net.blobs["data"].data.shape)
    out = net.forward()["prob"].copy()

    weights = tmp_path / "lenet.caffemodel"
    net.save(str(weights))
    proto = caffe_pb2.NetParameter.FromString(weights.read_bytes())
    assert {layer.name for layer in proto.layer if layer.blobs} == set(net.params)

    other = engine.Net(str(LENET / "lenet.prototxt"), engine.TEST, weights=str(weights))
    for name, blobs in net.params.items():
        for mine, theirs in zip(blobs, other.params[name], strict=True):
            np.testing.assert_array_equal(theirs.data, mine.data)
    other.blobs["data"].data[...] = net.blobs["data"].data
    np.testing.assert_array_equal(other.forward()["prob"], out)
