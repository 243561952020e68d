"""caffe.draw and ``engine draw``, as pycaffe code and Caffe's draw_net.py use them."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format

import engine as caffe
import engine.draw
from engine import layers as L
from engine import params as P
from engine.cli import main
from engine.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[2]
LENET = REPO / "models" / "lenet" / "lenet_train_test.prototxt"
PNG = b"\x89PNG\r\n\x1a\n"

needs_pydot = pytest.mark.skipif(importlib.util.find_spec("pydot") is None,
                                 reason='pydot not installed (pip install "moka[draw]")')
needs_graphviz = pytest.mark.skipif(
    importlib.util.find_spec("pydot") is None or shutil.which("dot") is None,
    reason='pydot or Graphviz\'s dot not installed (pip install "moka[draw]"; apt-get install '
           "graphviz)")


def lenet() -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    text_format.Merge(LENET.read_text(), net)
    return net


def layer(top) -> caffe_pb2.LayerParameter:
    return top.to_proto().layer[-1]


# -- labels and colours (no pydot needed) --------------------------------------------------------
def test_layer_labels_follow_pycaffe():
    x = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    conv = layer(L.Convolution(x, name="conv1", kernel_size=5, stride=2, pad=1, num_output=8,
                               param=[dict(lr_mult=1), dict(lr_mult=2)]))
    assert caffe.draw.get_layer_label(conv, "LR") == (
        r'"conv1\n(Convolution)\nkernel size: 5\nstride: 2\npad: 1"')
    assert caffe.draw.get_layer_label(conv, "TB", display_lrm=True) == (
        '"conv1 (Convolution) kernel size: 5 stride: 2 pad: 1 lr mult: 1.0, 2.0"')
    pool = layer(L.Pooling(x, name="pool1", pool=P.Pooling.AVE, kernel_size=3, stride=2))
    assert caffe.draw.get_layer_label(pool, "BT") == (
        '"pool1 (Pooling AVE) kernel size: 3 stride: 2 pad: 0"')
    bare = layer(L.Convolution(x, name="c", num_output=1, kernel_h=3, kernel_w=1))
    assert "kernel size: 3x1" in caffe.draw.get_layer_label(bare, "TB")
    relu = layer(L.ReLU(x, name="relu"))
    assert caffe.draw.get_layer_label(relu, "LR", display_lrm=True) == r'"relu\n(ReLU)"'

    assert caffe.draw.get_layer_lr_mult(conv) == (1.0, 2.0)
    assert caffe.draw.get_layer_lr_mult(bare) == (1.0, 1.0)
    with pytest.raises(ValueError, match="ReLU layers do not have a learning rate multiplier"):
        caffe.draw.get_layer_lr_mult(relu)
    frozen = layer(L.InnerProduct(x, num_output=2, param=[dict(lr_mult=0), dict(lr_mult=0)]))
    assert "lr mult" not in caffe.draw.get_layer_label(frozen, "LR", display_lrm=True)


def test_edge_labels_and_colours():
    net = lenet()
    assert caffe.draw.get_edge_label(net.layer[0]) == "Batch 64"
    assert caffe.draw.get_edge_label(net.layer[2]) == "20"
    assert caffe.draw.get_edge_label(net.layer[6]) == "500"
    assert caffe.draw.get_edge_label(net.layer[7]) == '""'
    assert caffe.draw.choose_color_by_layertype("Convolution") == "#FF5050"
    assert caffe.draw.choose_color_by_layertype("Deconvolution") == "#FF5050"
    assert caffe.draw.choose_color_by_layertype("Pooling") == "#FF9900"
    assert caffe.draw.choose_color_by_layertype("InnerProduct") == "#CC33FF"
    assert caffe.draw.choose_color_by_layertype("Softmax") == "#6495ED"
    assert caffe.draw.get_pooling_types_dict() == {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}


def test_missing_pydot_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)  # makes `import pydot` fail
    with pytest.raises(caffe.draw.DrawError, match=r'needs pydot.*pip install "moka\[draw\]"'):
        caffe.draw.draw_net(lenet(), "LR")
    out = REPO / "never.png"
    assert main(["draw", str(LENET), str(out)]) == 1
    assert not out.exists()


# -- graphs ----------------------------------------------------------------------------------------
def nodes(graph) -> dict[str, dict]:
    return {n.get_name().strip('"'): {k: str(v).strip('"') for k, v in n.get_attributes().items()}
            for n in graph.get_nodes()}


@needs_pydot
def test_graph_nodes_edges_and_phases():
    graph = caffe.draw.get_pydot_graph(lenet(), "LR")
    found = nodes(graph)
    assert found["blob data"]["shape"] == "octagon"
    assert found["blob loss"]["shape"] == "octagon"        # output blobs too
    assert found["layer conv1 Convolution"]["fillcolor"] == "#FF5050"
    assert found["layer relu1 ReLU"]["fillcolor"] == "#90EE90"  # in place
    assert found["layer loss SoftmaxWithLoss"]["fillcolor"] == "#6495ED"
    edges = {(e.get_source().strip('"'), e.get_destination().strip('"')): e.get_label().strip('"')
             for e in graph.get_edges()}
    assert edges[("layer conv1 Convolution", "blob conv1")] == "20"
    assert edges[("blob pool1", "layer conv2 Convolution")] == ""
    assert ("layer accuracy Accuracy", "blob accuracy") in edges
    unlabelled = caffe.draw.get_pydot_graph(lenet(), "LR", label_edges=False)
    assert {e.get_label().strip('"') for e in unlabelled.get_edges()} == {""}

    train = nodes(caffe.draw.get_pydot_graph(lenet(), "LR", phase=caffe.TRAIN))
    test = nodes(caffe.draw.get_pydot_graph(lenet(), "LR", phase=caffe.TEST))
    assert "layer accuracy Accuracy" not in train and "blob accuracy" not in train
    assert "layer accuracy Accuracy" in test
    assert "Batch 64" in caffe.draw.get_pydot_graph(lenet(), "LR", phase=caffe.TRAIN).to_string()
    assert "Batch 64" not in caffe.draw.get_pydot_graph(lenet(), "LR", phase=caffe.TEST
                                                        ).to_string()

    both = lenet()
    both.layer[2].exclude.add(phase=caffe.TEST)
    both.layer[2].include.add(phase=caffe.TRAIN)
    with pytest.raises(ValueError, match="layer conv1 has both include and exclude"):
        caffe.draw.get_pydot_graph(both, "LR", phase=caffe.TRAIN)


@needs_graphviz
def test_draw_net_returns_the_picture_bytes(tmp_path):
    assert caffe.draw.draw_net(lenet(), "LR").startswith(PNG)
    svg = caffe.draw.draw_net(lenet(), "TB", ext="svg", phase=caffe.TEST, display_lrm=True)
    assert b"<svg" in svg and b"lr mult: 1.0, 2.0" in svg and b"Batch 120" in svg
    caffe.draw.draw_net_to_file(lenet(), str(tmp_path / "lenet.png"))
    assert (tmp_path / "lenet.png").read_bytes().startswith(PNG)
    caffe.draw.draw_net_to_file(lenet(), str(tmp_path / "lenet.raw"), "BT")
    assert (tmp_path / "lenet.raw").read_text().startswith('digraph "LeNet"')
    with pytest.raises(caffe.draw.DrawError, match=r"could not draw a 'nope'.*not recognized"):
        caffe.draw.draw_net(lenet(), "LR", ext="nope")


@needs_graphviz
def test_every_shipped_net_draws():
    """As pycaffe's test_draw: every net prototxt under models/ draws."""
    paths = [p for p in sorted((REPO / "models").rglob("*.prototxt")) if "solver" not in p.name]
    assert paths
    for path in paths:
        net = engine.io.read_net_param(path)
        assert caffe.draw.draw_net(net, "LR").startswith(PNG), path


@needs_graphviz
def test_missing_graphviz_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(caffe.draw.DrawError, match=r"Graphviz's 'dot' program was not found"):
        caffe.draw.draw_net(lenet(), "LR")


@needs_graphviz
def test_engine_draw_as_draw_net_py(tmp_path, capsys):
    out = tmp_path / "net.png"
    assert main(["draw", str(LENET), str(out), "--rankdir", "TB", "--phase", "TRAIN",
                 "--display_lrm"]) == 0
    assert capsys.readouterr().out == f"Drawing net to {out}\n"
    assert out.read_bytes().startswith(PNG)
    raw = tmp_path / "net.raw"
    assert main(["draw", str(LENET), str(raw), "--phase", "TEST"]) == 0
    text = raw.read_text()
    assert "accuracy" in text and "Batch 120" in text and "Batch 64" not in text
    assert main(["draw", str(LENET), str(raw), "--phase", "VAL"]) == 2


@needs_pydot
def test_engine_draw_says_which_layer_has_both_kinds_of_rule(tmp_path, capsys):
    both = lenet()
    both.layer[2].exclude.add(phase=caffe.TEST)
    both.layer[2].include.add(phase=caffe.TRAIN)
    path = tmp_path / "both.prototxt"
    path.write_text(text_format.MessageToString(both))
    assert main(["draw", str(path), str(tmp_path / "net.raw"), "--phase", "TEST"]) == 1
    err = capsys.readouterr().err
    assert "layer conv1 has both include and exclude specified. Keep one kind" in err
    assert "internal error" not in err
