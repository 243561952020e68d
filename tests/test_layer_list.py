"""``engine layers`` and ``engine.layer_type_list()``: every type BVLC Caffe registers is there."""

from __future__ import annotations

import pytest

import engine
from engine.cli import main

# Every type BVLC Caffe (master) registers: REGISTER_LAYER_CLASS in src/caffe/layers/*.cpp and
# the creators in layer_factory.cpp (Convolution, Deconvolution, Pooling, LRN, ReLU, Sigmoid,
# Softmax, TanH, Python). The abstract bases (Recurrent, Loss, Neuron, BaseConvolution,
# BaseData) are not registered.
BVLC_TYPES = frozenset({
    "AbsVal", "Accuracy", "ArgMax", "BatchNorm", "BatchReindex", "Bias", "BNLL", "Clip", "Concat",
    "ContrastiveLoss", "Convolution", "Crop", "Data", "Deconvolution", "Dropout", "DummyData",
    "ELU", "Eltwise", "Embed", "EuclideanLoss", "Exp", "Filter", "Flatten", "HDF5Data",
    "HDF5Output", "HingeLoss", "Im2col", "ImageData", "InfogainLoss", "InnerProduct", "Input",
    "Log", "LRN", "LSTM", "LSTMUnit", "MemoryData", "MultinomialLogisticLoss", "MVN", "Parameter",
    "Pooling", "Power", "PReLU", "Python", "Reduction", "ReLU", "Reshape", "RNN", "Scale",
    "Sigmoid", "SigmoidCrossEntropyLoss", "Silence", "Slice", "Softmax", "SoftmaxWithLoss",
    "Split", "SPP", "Swish", "TanH", "Threshold", "Tile", "WindowData",
})


def test_every_bvlc_type_is_registered():
    missing = BVLC_TYPES - set(engine.layer_type_list())
    assert not missing, f"BVLC types not registered: {sorted(missing)}"
    assert len(BVLC_TYPES) == 61


def test_layer_type_list_is_sorted_and_unique():
    names = engine.layer_type_list()
    assert names == sorted(set(names))


def test_engine_layers_prints_one_type_per_line(capsys):
    assert main(["layers"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == engine.layer_type_list()
    assert {"Python", "Convolution", "LSTM"} <= set(printed)


@pytest.mark.parametrize("name", ["Python", "ReLU", "InnerProduct"])
def test_engine_layers_describe_gives_each_doc_line(capsys, name):
    assert main(["layers", "--describe"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(engine.layer_type_list())
    doc = engine.LAYERS[name].__doc__.strip().splitlines()[0]
    assert lines[name].endswith(doc)


def test_engine_layers_describe_ends_the_sentence_a_doc_line_breaks_off(capsys):
    assert main(["layers", "--describe"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    # BatchReindex's first doc line stops inside "(M values in": the listing completes it
    doc = " ".join(engine.LAYERS["BatchReindex"].__doc__.split())
    assert not engine.LAYERS["BatchReindex"].__doc__.strip().splitlines()[0].endswith(".")
    assert lines["BatchReindex"].endswith("(M values in [0, N)).")
    assert lines["BatchReindex"].split(None, 1)[1] in doc
