"""``engine summary``: shapes, parameters, multiply-adds and receptive fields by shape inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.blob import Blob, shape_only
from engine.cli import main
from engine.errors import MokaError
from engine.layer import TRAIN
from engine.summary import build_shape_net, parse_input_shapes, summarize

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
if not CONFORMANCE.is_dir():  # the worktree layout (/work/wt/NAME) and CI's (clone beside shared/)
    CONFORMANCE = Path("/work/shared/conformance")
CAFFENET = CONFORMANCE / "BVLC__caffe@11a4c16__models__bvlc_reference_caffenet__deploy.prototxt"
CAFFENET_TRAIN = (CONFORMANCE /
                  "BVLC__caffe@11a4c16__models__bvlc_reference_caffenet__train_val.prototxt")
GOOGLENET = CONFORMANCE / "BVLC__caffe@11a4c16__models__bvlc_googlenet__deploy.prototxt"
ALEXNET = CONFORMANCE / "BVLC__caffe__models__bvlc_alexnet__deploy.prototxt"
needs_conformance = pytest.mark.skipif(not CAFFENET.is_file(),
                                       reason="shared/conformance is not beside the checkout")


@needs_conformance
def test_caffenet_and_googlenet_parameter_counts():
    assert summarize(CAFFENET).params == 60_965_224
    assert summarize(GOOGLENET).params == 6_998_552


@needs_conformance
def test_alexnet_pool5_receptive_field_and_stride():
    s = summarize(ALEXNET)
    assert s.row("pool5").receptive_field == (195, 195)
    assert s.row("pool5").stride == (32, 32)
    assert s.row("conv1").receptive_field == (11, 11)
    assert s.row("fc6").receptive_field is None  # not spatial


@needs_conformance
def test_train_val_data_layer_needs_no_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the LMDB the net names is not here
    s = summarize(CAFFENET_TRAIN, phase=TRAIN)
    assert s.rows[0].type == "Data"
    assert s.rows[0].tops == [("data", (256, 3, 227, 227)), ("label", (256,))]
    assert s.params == 60_965_224
    assert s.notes == ["data layer 'data' (Data) not read: shapes from its parameters or "
                       "--input-shape (assumed: 3 channels for 'data')"]
    assert summarize(CAFFENET_TRAIN, phase=TRAIN, batch=4).rows[0].tops[0][1][0] == 4


SMALL = """
name: "small"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 dim: 10 dim: 10 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }
layer { name: "pool" type: "Pooling" bottom: "c" top: "p"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "dil" type: "Convolution" bottom: "p" top: "d"
  convolution_param { num_output: 2 kernel_size: 3 dilation: 2 bias_term: false } }
layer { name: "up" type: "Deconvolution" bottom: "p" top: "u"
  convolution_param { num_output: 3 kernel_size: 4 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "p" top: "f" inner_product_param { num_output: 7 } }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "c" top: "w"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 bias_term: false } }
"""


def test_small_net_by_hand(tmp_path):
    path = tmp_path / "small.prototxt"
    path.write_text(SMALL)
    s = summarize(path)
    assert s.batch == 2
    # conv: 6 outputs over 2 groups of 2 input channels, 3x3, 10x10 output (pad 1)
    conv = s.row("conv")
    assert conv.tops == [("c", (2, 6, 10, 10))]
    assert conv.params == 6 * 2 * 3 * 3 + 6
    assert conv.macs == (6 * 2 * 9) * (10 * 10)
    assert conv.activation_bytes == 2 * 6 * 10 * 10 * 4
    assert s.row("relu").activation_bytes == 0  # in place
    # pooling rounds up: ceil((10 - 3) / 2) + 1 = 5, where floor would give 4
    assert s.row("pool").tops == [("p", (2, 6, 5, 5))]
    # dilation 2: a 5x5 extent, 5 -> 1
    dil = s.row("dil")
    assert dil.tops == [("d", (2, 2, 1, 1))]
    assert dil.macs == (2 * 6 * 9) * 1
    # deconvolution: (5 - 1) * 2 + 4 = 12; one multiply-add per weight per input position
    up = s.row("up")
    assert up.tops == [("u", (2, 3, 12, 12))]
    assert up.params == 6 * 3 * 16 + 3
    assert up.macs == (6 * 3 * 16) * (5 * 5)
    fc = s.row("fc")
    assert fc.macs == (6 * 5 * 5) * 7
    # depthwise (a MobileNet fork's layer): one 3x3 filter per channel, 10 -> 4 at stride 2
    dw = s.row("dw")
    assert dw.tops == [("w", (2, 6, 4, 4))]
    assert dw.macs == (6 * 9) * (4 * 4)
    assert dw.receptive_field == (5, 5) and dw.stride == (2, 2)
    assert s.macs == conv.macs + dil.macs + up.macs + fc.macs + dw.macs
    assert s.flops == 2 * s.macs
    assert s.params == conv.params + dil.params + up.params + fc.params + dw.params
    assert s.model_mb == pytest.approx(s.params * 4 / 2**20)
    # receptive fields: conv 3 (stride 1), pool 3 + 2 = 5 (stride 2), dilated 5 + 4 * 2 = 13
    assert conv.receptive_field == (3, 3) and conv.stride == (1, 1)
    assert s.row("pool").receptive_field == (5, 5) and s.row("pool").stride == (2, 2)
    assert dil.receptive_field == (13, 13) and dil.stride == (2, 2)
    assert up.stride == (1, 1)  # deconvolution undoes the pooling stride
    acts = sum(np.prod(shape) for r in s.rows for j, (name, shape) in enumerate(r.tops)
               if name != "c" or r.name == "conv")
    assert s.activation_bytes == acts * 4
    assert s.training_bytes == 2 * s.activation_bytes + 3 * 4 * s.params


def test_shape_only_blobs_hold_no_memory(tmp_path):
    path = tmp_path / "small.prototxt"
    path.write_text(SMALL)
    net = build_shape_net(path, batch=1000)
    conv = net.blobs["c"]
    assert conv.shape == (1000, 6, 10, 10)
    assert conv.data.strides == (0, 0, 0, 0)
    assert net.params["fc"][0].data.strides == (0, 0)
    blob = Blob((2, 3))  # outside the block blobs are real again
    blob.data[...] = np.arange(6).reshape(2, 3)
    assert blob.data.sum() == 15
    with shape_only():
        ghost = Blob((10**6, 10**4))  # would be 40 GB
    assert ghost.count == 10**10


def test_shared_parameters_count_once(tmp_path):
    path = tmp_path / "siamese.prototxt"
    path.write_text("""
layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 3 dim: 5 } } }
layer { name: "f1" type: "InnerProduct" bottom: "a" top: "fa"
  param { name: "w" } param { name: "bias" } inner_product_param { num_output: 4 } }
layer { name: "f2" type: "InnerProduct" bottom: "b" top: "fb"
  param { name: "w" } param { name: "bias" } inner_product_param { num_output: 4 } }
""")
    s = summarize(path)
    assert s.params == 5 * 4 + 4
    assert s.row("f2").shared and s.row("f2").params == 0


def test_input_shape_for_a_data_layer_without_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = """
layer { name: "d" type: "Data" top: "data" top: "label"
  data_param { source: "missing_lmdb" batch_size: 16 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "y"
  inner_product_param { num_output: 2 } }
"""
    (tmp_path / "n.prototxt").write_text(net)
    with pytest.raises(MokaError, match="--input-shape data=N,C,H,W"):
        summarize("n.prototxt")
    s = summarize("n.prototxt", input_shapes=parse_input_shapes(["data=16,1,28,28"]))
    assert s.rows[0].tops == [("data", (16, 1, 28, 28)), ("label", (16,))]
    assert s.params == 28 * 28 * 2 + 2
    assert "assumed" not in s.notes[0]  # the shape was given
    with pytest.raises(MokaError, match="input-shape"):
        parse_input_shapes(["data=1,a"])


def resnet152_prototxt() -> str:
    """ResNet-152 deploy as in Kaiming He's Caffe release: conv (no bias) + BatchNorm + Scale."""
    lines = ['name: "ResNet-152"',
             'layer { name: "data" type: "Input" top: "data" '
             'input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }']

    def conv_bn(name, bottom, out, k, s, p, relu=True):
        lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" '
                     f'top: "{name}" convolution_param {{ num_output: {out} kernel_size: {k} '
                     f'stride: {s} pad: {p} bias_term: false }} }}')
        lines.append(f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{name}" '
                     f'top: "{name}" batch_norm_param {{ use_global_stats: true }} }}')
        lines.append(f'layer {{ name: "scale_{name}" type: "Scale" bottom: "{name}" '
                     f'top: "{name}" scale_param {{ bias_term: true }} }}')
        if relu:
            lines.append(f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" '
                         f'top: "{name}" }}')
        return name

    x = conv_bn("conv1", "data", 64, 7, 2, 3)
    lines.append(f'layer {{ name: "pool1" type: "Pooling" bottom: "{x}" top: "pool1" '
                 'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }')
    x = "pool1"
    for stage, (blocks, width) in enumerate(zip((3, 8, 36, 3), (64, 128, 256, 512),
                                                strict=True), 2):
        for b in range(blocks):
            name = f"res{stage}_{b}"
            stride = 2 if b == 0 and stage > 2 else 1
            shortcut = x
            if b == 0:
                shortcut = conv_bn(f"{name}_branch1", x, 4 * width, 1, stride, 0, relu=False)
            y = conv_bn(f"{name}_branch2a", x, width, 1, stride, 0)
            y = conv_bn(f"{name}_branch2b", y, width, 3, 1, 1)
            y = conv_bn(f"{name}_branch2c", y, 4 * width, 1, 1, 0, relu=False)
            lines.append(f'layer {{ name: "{name}" type: "Eltwise" bottom: "{shortcut}" '
                         f'bottom: "{y}" top: "{name}" }}')
            lines.append(f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" '
                         f'top: "{name}" }}')
            x = name
    lines.append(f'layer {{ name: "pool5" type: "Pooling" bottom: "{x}" top: "pool5" '
                 'pooling_param { pool: AVE kernel_size: 7 stride: 1 } }')
    lines.append('layer { name: "fc1000" type: "InnerProduct" bottom: "pool5" top: "fc1000" '
                 'inner_product_param { num_output: 1000 } }')
    lines.append('layer { name: "prob" type: "Softmax" bottom: "fc1000" top: "prob" }')
    return "\n".join(lines) + "\n"


def test_resnet152(tmp_path):
    path = tmp_path / "resnet152.prototxt"
    path.write_text(resnet152_prototxt())
    s = summarize(path)
    assert len(s.rows) > 500
    assert s.row("pool1").tops == [("pool1", (1, 64, 56, 56))]  # 112 -> 56: rounds up
    assert s.row("pool5").tops == [("pool5", (1, 2048, 1, 1))]
    # the learnable weights (conv, Scale, fc) are the well-known 60,192,808; BatchNorm's stored
    # mean, variance and factor come on top
    batch_norm = sum(r.params for r in s.rows if r.type == "BatchNorm")
    assert s.params - batch_norm == 60_192_808
    # 11.3 G multiply-adds (stride 2 on branch2a, as the Caffe release has it)
    assert s.flops / 2 == pytest.approx(11.3e9, rel=0.01)


def test_cli_summary(tmp_path, capsys):
    path = tmp_path / "small.prototxt"
    path.write_text(SMALL)
    assert main(["summary", str(path), "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "3x6x10x10" in out
    assert "parameters:" in out and "FLOPs per image:" in out
    assert main(["summary", str(tmp_path / "nope.prototxt")]) == 1
    assert "not found" in capsys.readouterr().err
