"""Net construction and running: Caffe's wiring rules and pycaffe's API."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import caffe_pb2
from engine.errors import NetError
from engine.net import Net


def net_param(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def build(text: str, phase=engine.TRAIN, **kwargs) -> Net:
    return Net(net_param(text), phase, rng=np.random.default_rng(0), **kwargs)


IP = """layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}"
  inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "uniform" min: -0.5 max: 0.5 }} }} {extra} }}"""


def ip(name, bottom, top, n=3, extra=""):
    return IP.format(name=name, bottom=bottom, top=top, n=n, extra=extra)


INPUTS = """
name: "tiny"
layer { name: "data" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 4 dim: 5 } shape { dim: 4 dim: 3 } } }
"""


# -- phase, level, stage rules ---------------------------------------------------------------
RULES = INPUTS + """
layer { name: "train_only" type: "ReLU" bottom: "x" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" bottom: "x" top: "b" include { phase: TEST } }
layer { name: "not_test" type: "ReLU" bottom: "x" top: "c" exclude { phase: TEST } }
layer { name: "level2" type: "ReLU" bottom: "x" top: "d" include { min_level: 2 } }
layer { name: "upto1" type: "ReLU" bottom: "x" top: "e" include { max_level: 1 } }
layer { name: "staged" type: "ReLU" bottom: "x" top: "f" include { stage: "deploy" } }
layer { name: "both" type: "ReLU" bottom: "x" top: "g" include { stage: "a" stage: "b" } }
layer { name: "not_a" type: "ReLU" bottom: "x" top: "h" include { not_stage: "a" } }
layer { name: "either" type: "ReLU" bottom: "x" top: "i"
        include { phase: TEST } include { stage: "a" } }
"""


@pytest.mark.parametrize(("phase", "level", "stages", "expected"), [
    (engine.TRAIN, 0, (), {"train_only", "not_test", "upto1", "not_a"}),
    (engine.TEST, 0, (), {"test_only", "upto1", "not_a", "either"}),
    (engine.TRAIN, 2, (), {"train_only", "not_test", "level2", "not_a"}),
    (engine.TRAIN, 1, ("deploy",), {"train_only", "not_test", "upto1", "staged", "not_a"}),
    (engine.TRAIN, 0, ("a",), {"train_only", "not_test", "upto1", "either"}),
    (engine.TRAIN, 0, ("a", "b"), {"train_only", "not_test", "upto1", "both", "either"}),
])
def test_include_exclude_rules(phase, level, stages, expected):
    net = build(RULES, phase, level=level, stages=stages)
    kept = {name for name in net._layer_names if not name.endswith("_split")}
    assert kept - {"data"} == expected


def test_include_and_exclude_together_is_an_error():
    text = INPUTS + """layer { name: "r" type: "ReLU" bottom: "x" top: "y"
                     include { phase: TRAIN } exclude { phase: TEST } }"""
    with pytest.raises(NetError, match="either include rules or exclude rules"):
        build(text)


# -- splits --------------------------------------------------------------------------------
def test_blob_read_by_three_layers_gets_a_split_with_caffes_names():
    text = INPUTS + ip("ip", "x", "y") + """
    layer { name: "r1" type: "ReLU" bottom: "y" top: "r1" }
    layer { name: "r2" type: "ReLU" bottom: "y" top: "r2" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
    """
    net = build(text)
    assert net._layer_names == ["data", "ip", "y_ip_0_split", "r1", "r2", "loss"]
    assert net.top_names["y_ip_0_split"] == [f"y_ip_0_split_{j}" for j in range(3)]
    assert net.bottom_names["r1"] == ["y_ip_0_split_0"]
    assert net.bottom_names["r2"] == ["y_ip_0_split_1"]
    assert net.bottom_names["loss"] == ["y_ip_0_split_2", "t"]
    # the split of the label "t"? It is read once: no split
    assert "t_data_1_split" not in net._layer_names
    net.blobs["x"].data[...] = np.random.default_rng(1).standard_normal((4, 5))
    out = net.forward()
    y = net.blobs["y"].data
    np.testing.assert_allclose(net.blobs["y_ip_0_split_1"].data, y)
    np.testing.assert_allclose(out["r2"], np.maximum(y, 0))


def test_split_sums_the_gradients_of_its_consumers():
    text = INPUTS + ip("ip", "x", "y") + """
    layer { name: "l1" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l1" }
    layer { name: "l2" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l2" loss_weight: 3 }
    """
    net = build(text, dtype=np.float64)
    rng = np.random.default_rng(2)
    net.blobs["x"].data[...] = rng.standard_normal((4, 5))
    net.blobs["t"].data[...] = rng.standard_normal((4, 3))
    net.clear_param_diffs()
    loss = net.forward_backward()
    y, t = net.blobs["y"].data, net.blobs["t"].data
    half = np.sum((y - t) ** 2) / (2 * 4)
    assert loss == pytest.approx(4 * half)
    dy = 4 * (y - t) / 4
    W = net.params["ip"][0].data
    np.testing.assert_allclose(net.params["ip"][0].diff, dy.T @ net.blobs["x"].data)
    np.testing.assert_allclose(net.params["ip"][1].diff, dy.sum(0))
    assert W.shape == (3, 5)


# -- in place --------------------------------------------------------------------------------
def test_in_place_chain_shares_one_blob_and_backprops():
    text = INPUTS + ip("ip", "x", "y") + """
    layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }
    layer { name: "drop" type: "Dropout" bottom: "y" top: "y" dropout_param { dropout_ratio: 0 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
    """
    net = build(text, dtype=np.float64)
    assert net.top_vecs[1][0] is net.top_vecs[2][0] is net.top_vecs[3][0]
    rng = np.random.default_rng(3)
    net.blobs["x"].data[...] = rng.standard_normal((4, 5))
    net.blobs["t"].data[...] = rng.standard_normal((4, 3))
    net.clear_param_diffs()
    net.forward_backward()
    W, b = (p.data for p in net.params["ip"])
    pre = net.blobs["x"].data @ W.T + b
    y = np.maximum(pre, 0)
    np.testing.assert_allclose(net.blobs["y"].data, y)
    dy = (y - net.blobs["t"].data) / 4 * (pre > 0)
    np.testing.assert_allclose(net.params["ip"][0].diff, dy.T @ net.blobs["x"].data)


def test_top_from_two_sources_is_an_error():
    text = INPUTS + ip("a", "x", "y") + ip("b", "x", "y")
    with pytest.raises(NetError, match="multiple sources"):
        build(text)


def test_unknown_bottom_names_the_layer():
    with pytest.raises(NetError, match=r"layer 'r'.*unknown bottom blob 'nope'"):
        build(INPUTS + 'layer { name: "r" type: "ReLU" bottom: "nope" top: "z" }')


def test_unknown_layer_type_lists_close_matches():
    with pytest.raises(NetError, match=r"'Relu'.*did you mean 'ReLU'"):
        build(INPUTS + 'layer { name: "r" type: "Relu" bottom: "x" top: "z" }')


# -- shared parameters ---------------------------------------------------------------------
SHARED = INPUTS + ip("ip1", "x", "y1", extra='param { name: "w" } param { name: "b" }') + \
    ip("ip2", "x", "y2", extra='param { name: "w" } param { name: "b" }') + """
    layer { name: "sum" type: "Eltwise" bottom: "y1" bottom: "y2" top: "y" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def test_shared_parameters_share_data_and_diff():
    net = build(SHARED, dtype=np.float64)
    w1, w2 = net.params["ip1"][0], net.params["ip2"][0]
    assert np.shares_memory(w1.data, w2.data) and np.shares_memory(w1.diff, w2.diff)
    assert len(net.learnable_params) == 2
    rng = np.random.default_rng(4)
    net.blobs["x"].data[...] = rng.standard_normal((4, 5))
    net.blobs["t"].data[...] = rng.standard_normal((4, 3))
    net.clear_param_diffs()
    net.forward_backward()
    x, y, t = net.blobs["x"].data, net.blobs["y"].data, net.blobs["t"].data
    np.testing.assert_allclose(y, 2 * (x @ w1.data.T + net.params["ip1"][1].data))
    dy = (y - t) / 4
    np.testing.assert_allclose(w1.diff, 2 * dy.T @ x)  # both uses accumulate


def test_sharing_needs_equal_shapes_unless_permissive():
    text = INPUTS + ip("ip1", "x", "y1", 3, 'param { name: "w" }') + \
        ip("ip2", "x", "y2", 2, 'param { name: "w" }')
    with pytest.raises(NetError, match="cannot share parameter 'w'"):
        build(text)


def test_sharer_lr_mult_must_match_owner():
    text = INPUTS + ip("ip1", "x", "y1", 3, 'param { name: "w" lr_mult: 1 }') + \
        ip("ip2", "x", "y2", 3, 'param { name: "w" lr_mult: 2 }')
    with pytest.raises(NetError, match="lr_mult"):
        build(text)


def test_lr_and_decay_mults_default_to_one():
    net = build(INPUTS + ip("ip", "x", "y", extra="param { lr_mult: 1 } "
                            "param { lr_mult: 2 decay_mult: 0 }"))
    assert net.params_lr == [1, 2]
    assert net.params_weight_decay == [1, 0]


# -- losses and backward need --------------------------------------------------------------
def test_two_losses_with_loss_weight():
    text = INPUTS + ip("ip", "x", "y") + """
    layer { name: "l1" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l1" loss_weight: 0.5 }
    layer { name: "l2" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "l2" loss_weight: 2 }
    """
    net = build(text, dtype=np.float64)
    net.blobs["x"].data[...] = 1.0
    net.blobs["t"].data[...] = 0.25
    loss = net.forward_from_to()
    single = net.blobs["l1"].data.item()
    assert loss == pytest.approx(2.5 * single)
    assert net.blob_loss_weights["l1"] == 0.5 and net.blob_loss_weights["l2"] == 2.0


def test_propagate_down_false_stops_the_gradient():
    text = INPUTS + ip("ip1", "x", "y1") + ip("ip2", "y1", "y2") + """
    layer { name: "loss" type: "EuclideanLoss" bottom: "y2" bottom: "t" top: "loss" }
    """
    text = text.replace('bottom: "y1" top: "y2"', 'bottom: "y1" top: "y2" propagate_down: false')
    net = build(text, dtype=np.float64)
    idx = net._layer_names.index("ip2")
    assert net.bottom_need_backward[idx] == [False]
    net.blobs["x"].data[...] = 1.0
    net.clear_param_diffs()
    net.forward_backward()
    assert np.any(net.params["ip2"][0].diff != 0)
    assert not np.any(net.params["ip1"][0].diff)  # nothing flowed below ip2
    assert not net.layer_need_backward[net._layer_names.index("ip1")]


def test_layers_not_reaching_a_loss_skip_backward():
    text = INPUTS + ip("ip", "x", "y") + ip("side", "x", "s") + """
    layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
    """
    net = build(text)
    need = dict(zip(net._layer_names, net.layer_need_backward, strict=True))
    assert need == {"data": False, "x_data_0_split": False, "ip": True, "side": False,
                    "loss": True}


def test_lr_mult_zero_and_force_backward():
    base = INPUTS + ip("ip", "x", "y", extra="param { lr_mult: 0 } param { lr_mult: 0 }") + \
        'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }'
    net = build(base)
    assert net.layer_need_backward == [False, False, False]
    forced = build("force_backward: true\n" + base)
    assert forced.layer_need_backward == [True, True, True]
    # EuclideanLoss, unlike most losses, lets force_backward reach its second bottom
    assert forced.bottom_need_backward[2] == [True, True]
    forced.forward()
    out = forced.backward()
    assert set(out) == {"x", "t"}


# -- pycaffe surface -----------------------------------------------------------------------
def test_pycaffe_api(tmp_path):
    text = INPUTS + ip("ip", "x", "y") + \
        'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }'
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    net = engine.Net(str(path), engine.TEST)
    assert net.inputs == ["x", "t"] and net.outputs == ["loss"]
    assert list(net.params) == ["ip"] and net.params["ip"][0].shape == (3, 5)
    assert [layer.type for layer in net.layers] == ["Input", "InnerProduct", "EuclideanLoss"]
    assert net.blobs["x"].count == 20 and net.blobs["x"].shape == (4, 5)
    out = net.forward(x=np.ones((4, 5)), t=np.zeros((4, 3)))
    assert set(out) == {"loss"} and out["loss"].shape == ()
    diffs = net.backward()
    assert set(diffs) == {"x", "t"}

    net.blobs["x"].reshape(7, 5)
    net.blobs["t"].reshape(7, 3)
    net.reshape()
    assert net.blobs["y"].shape == (7, 3)

    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    other = engine.Net(str(path), str(weights), engine.TEST)  # legacy argument order
    np.testing.assert_array_equal(other.params["ip"][0].data, net.params["ip"][0].data)
    third = engine.Net(str(path), engine.TRAIN, weights=str(weights))
    np.testing.assert_array_equal(third.params["ip"][1].data, net.params["ip"][1].data)


def test_copy_from_shape_mismatch_names_layer_and_shapes(tmp_path):
    small = build(INPUTS + ip("ip", "x", "y", 3))
    weights = tmp_path / "w.caffemodel"
    small.save(weights)
    big = build(INPUTS + ip("ip", "x", "y", 4))
    with pytest.raises(NetError, match=r"layer 'ip'.*\(3, 5\).*\(4, 5\).*rename the layer"):
        big.copy_from(weights)


def test_copy_from_matches_by_name_and_ignores_others(tmp_path):
    a = build(INPUTS + ip("ip", "x", "y") + ip("extra", "x", "z"))
    weights = tmp_path / "a.caffemodel"
    a.save(weights)
    b = build(INPUTS + ip("ip", "x", "y") + ip("renamed", "x", "z"))
    fresh = b.params["renamed"][0].data.copy()
    b.copy_from(str(weights))
    np.testing.assert_array_equal(b.params["ip"][0].data, a.params["ip"][0].data)
    np.testing.assert_array_equal(b.params["renamed"][0].data, fresh)


def test_caffemodel_holds_split_layers_and_all_blobs():
    net = build(INPUTS + ip("ip", "x", "y") + ip("ip2", "x", "z"))
    proto = net.to_proto()
    assert [layer.name for layer in proto.layer] == ["data", "x_data_0_split", "ip", "ip2"]
    assert len(proto.layer[2].blobs) == 2
    assert list(proto.layer[2].blobs[0].shape.dim) == [3, 5]


def test_pycaffe_globals():
    assert {"Convolution", "InnerProduct", "ReLU", "SoftmaxWithLoss"} <= set(
        engine.layer_type_list())
    engine.set_mode_cpu()
    engine.set_random_seed(5)
    text = INPUTS + ip("ip", "x", "y")
    a = Net(net_param(text), engine.TRAIN)
    engine.set_random_seed(5)
    b = Net(net_param(text), engine.TRAIN)
    np.testing.assert_array_equal(a.params["ip"][0].data, b.params["ip"][0].data)


def test_forward_all_batches_and_drops_the_padding():
    net = build(INPUTS + ip("ip", "x", "y"), dtype=np.float64)
    x = np.random.default_rng(6).standard_normal((10, 5))
    out = net.forward_all(x=x, t=np.zeros((10, 3)))
    W, b = (p.data for p in net.params["ip"])
    assert out["y"].shape == (10, 3)
    np.testing.assert_allclose(out["y"], x @ W.T + b)
