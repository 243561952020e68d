"""Every real Caffe prototxt in ../shared/conformance parses and upgrades to the current format.

Files marked ``@2e33058`` are V0 nets, ``@11a4c16`` V1 nets; the rest are current Caffe
(9b89154). Solver files (``solver`` in the name) are read as SolverParameter. Building the nets
is tests/test_conformance_build.py's job.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from engine import caffe_pb2
from engine.io import read_net_param, read_solver_param
from engine.upgrade import V1_LAYER_TYPES, net_needs_upgrade

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
FILES = sorted(CONFORMANCE.glob("*.prototxt"))
SOLVERS = [p for p in FILES if "solver" in p.name]
NETS = [p for p in FILES if "solver" not in p.name]
V0, V1 = "BVLC__caffe@2e33058__", "BVLC__caffe@11a4c16__"
CURRENT_TYPES = set(V1_LAYER_TYPES.values()) | {
    "Input", "BatchNorm", "Scale", "Bias", "ELU", "PReLU", "Reshape", "Embed", "Python",
    "Crop", "Parameter", "Tile", "Log", "Reduction", "SPP", "LSTM", "RNN", "Swish", "Clip"}

pytestmark = pytest.mark.skipif(not CONFORMANCE.is_dir(),
                                reason=f"conformance corpus not found at {CONFORMANCE}")


def corpus(name: str) -> Path:
    return CONFORMANCE / name


def assert_current(net: caffe_pb2.NetParameter, source: Path) -> None:
    assert not len(net.layers), f"{source.name}: V1 layers left"
    assert not len(net.input) and not len(net.input_dim) and not len(net.input_shape)
    assert len(net.layer) > 0
    for layer in net.layer:
        assert layer.type in CURRENT_TYPES, f"{source.name}: layer {layer.name!r} {layer.type!r}"
    assert not net_needs_upgrade(net)


def test_corpus_is_complete() -> None:
    assert len(NETS) >= 40 and len(SOLVERS) >= 20
    assert any(p.name.startswith(V0) for p in NETS) and any(p.name.startswith(V1) for p in NETS)


@pytest.mark.parametrize("path", NETS, ids=lambda p: p.name)
def test_net_parses_and_upgrades(path: Path) -> None:
    net = read_net_param(path)
    assert_current(net, path)
    text = text_format.MessageToString(net)  # the upgraded net survives a text round trip
    assert read_net_param(text, is_text=True) == net


@pytest.mark.parametrize("path", SOLVERS, ids=lambda p: p.name)
def test_solver_parses_and_upgrades(path: Path) -> None:
    solver = read_solver_param(path)
    assert not solver.HasField("solver_type")
    assert solver.type in {"SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"}
    assert solver.snapshot_prefix
    for net in [*solver.test_net_param, solver.net_param, solver.train_net_param]:
        assert not len(net.layers) and not len(net.input)


def test_v0_imagenet_has_padded_convolutions() -> None:
    net = read_net_param(corpus(V0 + "examples__imagenet__imagenet_train.prototxt"))
    convs = {layer.name: layer.convolution_param for layer in net.layer
             if layer.type == "Convolution"}
    assert {name: list(p.pad) for name, p in convs.items()} == {
        "conv1": [], "conv2": [2], "conv3": [1], "conv4": [1], "conv5": [1]}
    assert list(convs["conv1"].kernel_size) == [11] and list(convs["conv1"].stride) == [4]
    assert convs["conv2"].group == 2
    data = net.layer[0]
    assert data.type == "Data" and data.data_param.batch_size == 256
    assert data.transform_param.crop_size == 227 and data.transform_param.mirror
    assert data.transform_param.mean_file.endswith("imagenet_mean.binaryproto")
    types = [layer.type for layer in net.layer]
    assert types.count("LRN") == 2 and types.count("InnerProduct") == 3
    assert types[-1] == "SoftmaxWithLoss"


def test_v0_deploy_inputs_become_an_input_layer() -> None:
    net = read_net_param(corpus(V0 + "examples__imagenet__imagenet_deploy.prototxt"))
    first = net.layer[0]
    assert (first.type, list(first.top)) == ("Input", ["data"])
    assert list(first.input_param.shape[0].dim) == [10, 3, 227, 227]


def test_v1_lenet_types_and_multipliers() -> None:
    net = read_net_param(corpus(V1 + "examples__mnist__lenet_train_test.prototxt"))
    assert [layer.type for layer in net.layer] == [
        "Data", "Data", "Convolution", "Pooling", "Convolution", "Pooling", "InnerProduct",
        "ReLU", "InnerProduct", "Accuracy", "SoftmaxWithLoss"]
    for layer in net.layer:
        if layer.type in ("Convolution", "InnerProduct"):
            assert [p.lr_mult for p in layer.param] == [1, 2], layer.name
    train, test = net.layer[0], net.layer[1]
    assert train.include[0].phase == caffe_pb2.TRAIN and test.include[0].phase == caffe_pb2.TEST
    assert train.transform_param.scale == pytest.approx(0.00390625)
    assert train.data_param.backend == caffe_pb2.DataParameter.LMDB


def test_v1_googlenet_deploy_starts_with_an_input_layer() -> None:
    net = read_net_param(corpus(V1 + "models__bvlc_googlenet__deploy.prototxt"))
    first = net.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["data"])
    assert list(first.input_param.shape[0].dim) == [10, 3, 224, 224]
    assert sum(layer.type == "Concat" for layer in net.layer) == 9
    assert net.layer[-1].type == "Softmax"


def test_v1_consolidated_solver_inline_nets_are_upgraded() -> None:
    solver = read_solver_param(corpus(V1 + "examples__mnist__lenet_consolidated_solver.prototxt"))
    types = [layer.type for layer in solver.net_param.layer]
    assert types[:4] == ["Data", "Data", "Data", "Convolution"] and types[-1] == "SoftmaxWithLoss"
    assert [s.stage[0] for s in solver.test_state] == ["test-on-test-set", "test-on-train-set"]
