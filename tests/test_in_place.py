"""In-place chains: the Net keeps a copy of a value only where a layer's backward reads it and a
later in-place layer overwrites it, so every chain gets its true gradient (float64 numerical
checks over the whole net), and chains Caffe already gets right (BatchNorm -> Scale -> ReLU)
get no copies at all."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import caffe_pb2
from engine.net import Net

HEAD = """
name: "chain"
force_backward: true
layer { name: "data" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }
"""
TAIL = """
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.7 }
                              bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""
SCALE = """layer { name: "scale" type: "Scale" bottom: "x" top: "x"
  scale_param { bias_term: true filler { type: "gaussian" std: 1 }
                bias_filler { type: "gaussian" std: 0.5 } } }"""


def in_place(name: str, kind: str, extra: str = "", blob: str = "x") -> str:
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{blob}" top: "{blob}" {extra} }}'


RELU = in_place("relu", "ReLU")
POWER = in_place("power", "Power", "power_param { scale: 2 shift: 0.5 }")
SQUARE = in_place("square", "Power", "power_param { power: 2 scale: 0.5 shift: 1 }")
DROPOUT = in_place("drop", "Dropout", "dropout_param { dropout_ratio: 0.3 }")
SIGMOID = in_place("sigmoid", "Sigmoid")
TANH = in_place("tanh", "TanH")
SCALE_ONLY = in_place("scale2", "Scale", 'scale_param { filler { type: "gaussian" std: 1 } }')

CHAINS = {
    "scale-relu-power (the issue's chain)": [SCALE, RELU, POWER],
    "relu-dropout": [RELU, DROPOUT],
    "sigmoid-power": [SIGMOID, SQUARE],
    "tanh-scale": [TANH, SCALE_ONLY],
    "scale-sigmoid-tanh-relu-power": [SCALE, SIGMOID, TANH, RELU, SQUARE],
}


def build(text: str, phase=engine.TRAIN) -> Net:
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    return Net(param, phase, rng=np.random.default_rng(5), dtype=np.float64)


def net_loss(net: Net, inputs: dict[str, np.ndarray]) -> float:
    for name, array in inputs.items():
        net.blobs[name].data[...] = array  # the chain overwrote x: feed it afresh every time
    for layer in net.layers:
        layer.rng = np.random.default_rng(11)  # the same dropout mask in every pass
    return net.forward_from_to()


def check_net_gradient(net: Net, inputs: dict[str, np.ndarray], step=1e-5, tol=1e-6) -> int:
    """Compare every input and parameter diff with central differences of the net's loss."""
    net_loss(net, inputs)
    net.clear_param_diffs()
    net._seed_loss_diffs()
    net.backward_from_to()
    targets = [(f"input {n}", inputs[n], net.blobs[n].diff.copy()) for n in inputs]
    targets += [(name, blob.data, blob.diff.copy())
                for name, blob in zip(net.learnable_param_names, net.learnable_params,
                                      strict=True)]
    checked = 0
    for name, values, analytic in targets:
        flat = values.reshape(-1)
        for k in range(flat.size):
            keep = flat[k]
            flat[k] = keep + step
            plus = net_loss(net, inputs)
            flat[k] = keep - step
            minus = net_loss(net, inputs)
            flat[k] = keep
            numeric = (plus - minus) / (2 * step)
            got = analytic.reshape(-1)[k]
            assert abs(got - numeric) <= tol * max(abs(got), abs(numeric), 1.0), (
                f"{name}[{k}]: backward gives {got:.8g}, numerically {numeric:.8g}")
            checked += 1
    return checked


def inputs_for(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # away from ReLU's kink at 0 whatever the Scale does: |x| >= 0.3
    x = rng.uniform(0.3, 1.5, (3, 4)) * rng.choice([-1.0, 1.0], (3, 4))
    return {"x": x, "t": rng.standard_normal((3, 2))}


@pytest.mark.parametrize("chain", CHAINS, ids=list(CHAINS))
def test_in_place_chain_matches_the_numerical_gradient(chain):
    net = build(HEAD + "\n".join(CHAINS[chain]) + TAIL)
    # keep the Scale's output away from the ReLU kink too
    for layer in net.layers:
        if layer.type == "Scale":
            layer.blobs[0].data[...] = np.where(layer.blobs[0].data < 0, -1.2, 1.3)
            if len(layer.blobs) > 1:
                layer.blobs[1].data[...] = 0.1
    assert check_net_gradient(net, inputs_for(3)) > 12


def test_the_issues_chain_keeps_one_copy_and_the_blob_holds_the_final_value():
    net = build(HEAD + "\n".join([SCALE, RELU, POWER]) + TAIL)
    # ReLU's backward reads its output, which Power overwrites; Scale keeps its own input
    assert net.in_place_copies == [("relu", "x", "power")]
    inputs = inputs_for(4)
    net_loss(net, inputs)
    scale, bias = (b.data for b in net.params["scale"])
    expected = 2 * np.maximum(inputs["x"] * scale + bias, 0) + 0.5
    np.testing.assert_allclose(net.blobs["x"].data, expected)
    net.backward_from_to()
    np.testing.assert_allclose(net.blobs["x"].data, expected)  # backward changes no data


RESNET = """
name: "resnet-unit"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "t"
        input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } shape { dim: 2 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "t" top: "loss" }
"""


# SegNet/ENet's form: the forks' BN layer (its own scale and shift) in place, then ReLU
SEGNET = RESNET.replace(
    'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }',
    'layer { name: "bn" type: "BN" bottom: "conv" top: "conv" bn_param { '
    'scale_filler { type: "constant" value: 1.5 } shift_filler { type: "constant" value: 0.2 } } }'
).replace('layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" '
          'scale_param { bias_term: true } }', "")


@pytest.mark.parametrize("phase", [engine.TRAIN, engine.TEST])
@pytest.mark.parametrize("text", [RESNET, SEGNET], ids=["resnet", "segnet"])
def test_chains_that_caffe_gets_right_get_no_copies(phase, text):
    net = build(text, phase)
    assert net.in_place_copies == []
    blobs = net.top_vecs
    assert blobs[1][0] is blobs[2][0] is blobs[3][0]  # one blob, as in Caffe


@pytest.mark.parametrize("text", [RESNET, SEGNET], ids=["resnet", "segnet"])
def test_resnet_unit_gradient(text):
    net = build(text)
    rng = np.random.default_rng(8)
    inputs = {"data": rng.standard_normal((2, 3, 4, 4)), "t": rng.standard_normal((2, 4))}
    assert check_net_gradient(net, inputs, tol=1e-5) > 100


def test_no_copies_when_the_net_runs_no_backward():
    net = build(HEAD.replace("force_backward: true", "") + "\n".join([SIGMOID, SQUARE]) + """
        layer { name: "silence" type: "Silence" bottom: "x" }""", engine.TEST)
    assert net.in_place_copies == []


def test_a_view_of_the_value_overwritten_in_place_is_protected_too():
    # Sigmoid's backward reads its top; Flatten's top is a view of it and Power writes in place
    net = build(HEAD + """
        layer { name: "sigmoid" type: "Sigmoid" bottom: "x" top: "s" }
        layer { name: "flat" type: "Flatten" bottom: "s" top: "f" }
        """ + SQUARE.replace('"x"', '"f"') + TAIL.replace('bottom: "x"', 'bottom: "f"'))
    assert net.in_place_copies == [("sigmoid", "s", "square")]
    assert check_net_gradient(net, inputs_for(6)) > 12
