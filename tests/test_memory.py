"""Memory planning (engine/memory.py): lazy diffs, recycled TEST forwards, shared workspaces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import make_layer, random_blob

import engine
from engine import fillers, kernels
from engine.errors import NetError
from engine.io import read_net_param
from engine.layer import LAYERS, layer_class
from engine.memory import SharedWorkspace, plan_slots, storage_groups
from engine.net import Net

HERE = Path(__file__).resolve()
CONFORMANCE = next((p / "shared" / "conformance" for p in HERE.parents
                    if (p / "shared" / "conformance").is_dir()), None)
DATA_TYPES = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "DummyData", "Python"}


def deploy_nets() -> list[Path]:
    """The conformance corpus's deploy nets whose layer types Moka registers (as
    tests/test_conformance_build.py picks them)."""
    if CONFORMANCE is None:
        return []
    layer_class("Input")
    chosen = []
    for path in sorted(CONFORMANCE.glob("*.prototxt")):
        if "solver" in path.name:
            continue
        types = {layer.type for layer in read_net_param(path).layer}
        if "Input" in types and not types & DATA_TYPES and types <= set(LAYERS):
            chosen.append(path)
    return chosen


def batch_one(path: Path):
    param = read_net_param(path)
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = 1
    return param


def randomise(net: Net, rng: np.random.Generator) -> dict[str, np.ndarray]:
    values = rng.standard_normal(1 << 16).astype(np.float32) * 0.1
    for blobs in net.params.values():
        for blob in blobs:  # rank one, random rows and columns: fast on AlexNet's fc6
            rows = blob.data.reshape(blob.shape[0] if blob.shape else 1, -1)
            n, m = rows.shape
            cols = values[:m] if m <= values.size else np.resize(values, m)
            np.multiply(rng.standard_normal((n, 1)).astype(np.float32), cols, out=rows)
    return {name: rng.standard_normal(net.blobs[name].shape, np.float32)
            for name in net.inputs}


@pytest.mark.skipif(CONFORMANCE is None, reason="conformance corpus not found")
@pytest.mark.parametrize("path", deploy_nets(), ids=lambda p: p.name)
def test_recycled_forward_is_bit_identical(path):
    net = Net(batch_one(path), engine.TEST, rng=np.random.default_rng(0))
    inputs = randomise(net, np.random.default_rng(1))
    plain = {k: v.copy() for k, v in net.forward(**inputs).items()}
    net.recycle_memory()
    assert net.recycling
    for _ in range(2):  # the second pass runs in slots the first one left dirty
        recycled = net.forward(**inputs)
        assert recycled.keys() == plain.keys()
        for name, value in plain.items():
            assert np.array_equal(recycled[name], value), name
    assert not any(blob.has_diff for blob in net.blobs.values())


def lenet_deploy() -> str:
    return """
    name: "small"
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1
            dim: 12 dim: 12 } } }
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
            convolution_param { num_output: 4 kernel_size: 3
            weight_filler { type: "gaussian" std: 0.3 } } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
            pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
    layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" }
    layer { name: "flat" type: "Flatten" bottom: "norm1" top: "flat" }
    layer { name: "ip1" type: "InnerProduct" bottom: "flat" top: "ip1"
            inner_product_param { num_output: 6 weight_filler { type: "xavier" } } }
    layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
            inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
    layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
    """


def small_net(tmp_path, **kwargs) -> Net:
    path = tmp_path / "small.prototxt"
    path.write_text(lenet_deploy())
    return Net(str(path), engine.TEST, rng=np.random.default_rng(3), **kwargs)


def test_recycling_shares_memory_and_keeps_what_is_asked(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 1, 12, 12)).astype(np.float32)
    plain = small_net(tmp_path)
    out = plain.forward(data=x)
    net = small_net(tmp_path, recycle=True)
    assert len(net._recycle.slots) < len(net.blobs) - 2  # intermediates share slots
    assert np.array_equal(net.forward(data=x)["prob"], out["prob"])
    # an intermediate named in forward(blobs=...) is kept from then on
    got = net.forward(blobs=["pool1"], data=x)
    assert np.array_equal(got["pool1"], plain.blobs["pool1"].data)
    net.forward(data=x)
    assert np.array_equal(net.blobs["pool1"].data, plain.blobs["pool1"].data)
    net.keep_blobs("ip1")
    net.forward(data=x)
    assert np.array_equal(net.blobs["ip1"].data, plain.blobs["ip1"].data)
    net.recycle_memory(False)
    net.forward(data=x)
    for name, blob in plain.blobs.items():
        assert np.array_equal(net.blobs[name].data, blob.data), name


def test_recycled_net_refuses_backward_and_partial_forward(tmp_path):
    net = small_net(tmp_path, recycle=True)
    with pytest.raises(NetError, match="backward"):
        net.backward()
    with pytest.raises(NetError, match="first layer"):
        net.forward(start="ip1")


def test_recycled_net_follows_a_new_input_shape(tmp_path):
    net = small_net(tmp_path, recycle=True)
    plain = small_net(tmp_path)
    for n in (5, 1):
        x = np.random.default_rng(n).standard_normal((n, 1, 12, 12)).astype(np.float32)
        for each in (net, plain):
            each.blobs["data"].reshape(n, 1, 12, 12)
            each.reshape()
        assert np.array_equal(net.forward(data=x)["prob"], plain.forward(data=x)["prob"])


def test_test_phase_net_with_a_loss_recycles_too(tmp_path):
    path = tmp_path / "partial.prototxt"
    path.write_text(TRAIN_NET)
    plain = Net(str(path), engine.TEST, rng=np.random.default_rng(0))
    net = Net(str(path), engine.TEST, rng=np.random.default_rng(0), recycle=True)
    for each in (plain, net):
        each.blobs["data"].data[...] = np.arange(4 * 2 * 6 * 6).reshape(4, 2, 6, 6) % 7
        each.blobs["label"].data[...] = [0, 1, 2, 3]
    assert net.forward_from_to() == plain.forward_from_to()
    assert np.array_equal(net.blobs["loss"].data, plain.blobs["loss"].data)
    with pytest.raises(NetError, match="backward"):
        net.forward_backward()
    net.recycle_memory(False)
    net.forward_backward()
    plain.forward_backward()
    assert np.array_equal(net.params["ip"][0].diff, plain.params["ip"][0].diff)


def test_test_net_has_no_diffs(tmp_path):
    net = small_net(tmp_path)
    net.forward(data=np.ones((2, 1, 12, 12), np.float32))
    assert not any(blob.has_diff for blob in net.blobs.values())
    assert not any(blob.has_diff for blobs in net.params.values() for blob in blobs)


TRAIN_NET = """
name: "partial"
force_backward: false
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 0 } param { lr_mult: 0 }
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "flat" type: "Flatten" bottom: "conv1" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "side" type: "InnerProduct" bottom: "flat" top: "side"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_train_net_allocates_diffs_only_where_backward_runs(tmp_path):
    path = tmp_path / "partial.prototxt"
    path.write_text(TRAIN_NET)
    net = Net(str(path), engine.TRAIN, rng=np.random.default_rng(0))
    net.blobs["data"].data[...] = 1
    net.blobs["label"].data[...] = [0, 1, 2, 3]
    net.forward_backward()
    has = {name: blob.has_diff for name, blob in net.blobs.items()}
    # frozen conv1: nothing below ip needs a gradient; side feeds no loss
    assert not has["data"] and not has["label"] and not has["side"]
    assert not has["conv1"]
    assert has["ip"] and has["loss"]
    assert net.params["ip"][0].has_diff and not net.params["side"][0].has_diff


def test_fill_into_draws_the_values_fill_does(monkeypatch):
    monkeypatch.setattr(fillers, "CHUNK", 7)
    from engine import caffe_pb2

    for kind in ("uniform", "gaussian", "xavier", "msra", "constant"):
        param = caffe_pb2.FillerParameter(type=kind, value=0.5)
        expected = fillers.fill((5, 4, 3), param, np.random.default_rng(9)).astype(np.float32)
        out = np.empty((5, 4, 3), np.float32)
        fillers.fill_into(out, param, np.random.default_rng(9))
        assert np.array_equal(out, expected), kind


def test_plan_slots_reuses_a_slot_after_its_last_reader():
    # a: layers 0-1, b: 1-2, c: 2-3, d: 3-4 (pinned) -> a and c can share
    slot_of, sizes = plan_slots([10, 20, 8, 5], [0, 1, 2, 3], [1, 2, 3, 4],
                                [False, False, False, True])
    assert slot_of[3] == -1
    assert slot_of[0] == slot_of[2] != slot_of[1]
    assert sorted(sizes) == [10, 20]


def test_shared_workspace_shares_scratch_but_not_filled_buffers():
    shared = SharedWorkspace()
    a, b = shared.view("a"), shared.view("b")
    assert np.shares_memory(a.get("columns", (3, 3), np.float32),
                            b.get("columns", (2, 2), np.float32))
    assert shared.nbytes == 36
    padded = a.get("padded", (3, 3), np.float32, fill=0)
    padded[1, 1] = 7  # the interior
    b.get("padded", (3, 3), np.float32)[...] = 5
    again = a.get("padded", (3, 3), np.float32, fill=0)
    assert again[1, 1] == 7 and again.sum() == 7  # the border kept its zeros


def test_thread_lanes_of_a_shared_workspace_have_buffers_of_their_own():
    shared = SharedWorkspace()
    a, b = shared.view("a"), shared.view("b")
    lane0, lane1 = a.lane(0), a.lane(1).child(3)
    assert lane0 is a
    assert not np.shares_memory(lane0.get("columns", (4,), np.float32),
                                lane1.get("columns", (4,), np.float32))
    assert np.shares_memory(lane1.get("columns", (4,), np.float32),
                            b.lane(1).get("columns", (2,), np.float32))  # lanes across layers


def test_convolution_in_the_shared_workspace_keeps_its_results(monkeypatch):
    monkeypatch.setattr(kernels, "CONV_BLOCK_BYTES", 600)  # several batch blocks
    text = ('type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 pad: 1 '
            'stride: 2 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    bottom = random_blob((5, 2, 7, 7), seed=4)
    plain, top_plain = make_layer(text, [bottom])
    layer, top = make_layer(text, [bottom])
    shared = SharedWorkspace()
    layer.share_workspace(shared, keep_for_backward=True)
    other = shared.view("another layer")  # dirties the shared buffers between calls
    plain.forward([bottom], top_plain)
    layer.forward([bottom], top)
    np.testing.assert_array_equal(top[0].data, top_plain[0].data)
    for name, array in shared._buffers.items():
        array[...] = 255
        other.get(name, (1,), np.float64)
    layer.forward([bottom], top)
    np.testing.assert_array_equal(top[0].data, top_plain[0].data)
    check_gradient(layer, [bottom], top)


@pytest.mark.parametrize("path", [p for p in deploy_nets() if "googlenet" in p.name][:1],
                         ids=lambda p: p.name)
def test_blobs_live_at_once_never_share_a_slot(path):
    net = Net(batch_one(path), engine.TEST, recycle=True)
    names = {id(blob): name for name, blob in net.blobs.items()}
    roots, born, last, _ = storage_groups(net.bottom_vecs, net.top_vecs, names)
    slot = {id(root): s for root, s in net._recycle.roots}
    assert len(slot) > 2 * len(net._recycle.slots)  # real reuse
    for i in range(len(net.layers)):
        live = [slot[id(r)] for g, r in enumerate(roots)
                if born[g] <= i <= last[g] and id(r) in slot]
        assert len(live) == len(set(live)), net.layers[i].name


@pytest.mark.parametrize("keep", [True, False])
def test_convolution_backward_never_reuses_columns_another_layer_overwrote(keep):
    text = ('type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 '
            'weight_filler { type: "gaussian" } }')
    x, other_x = random_blob((2, 2, 6, 6), seed=1), random_blob((2, 2, 6, 6), seed=2)
    plain, plain_top = make_layer(text, [x], seed=5)
    layer, top = make_layer(text, [x], seed=5)
    later, later_top = make_layer(text, [other_x], seed=6)
    shared = SharedWorkspace()
    layer.share_workspace(shared, keep_for_backward=keep)
    later.share_workspace(shared, keep_for_backward=False)
    dy = np.random.default_rng(3).standard_normal(top[0].shape)
    for conv, bottom, tops in ((plain, x, plain_top), (layer, x, top)):
        conv.forward([bottom], tops)
        if conv is layer:
            later.forward([other_x], later_top)  # fills the shared columns with other_x's
        tops[0].diff[...] = dy
        conv.backward(tops, [False], [bottom])
    np.testing.assert_array_equal(layer.blobs[0].diff, plain.blobs[0].diff)


@pytest.mark.parametrize("make", ["mobilenet_v1", "shufflenet_v2", "ssd_head"])
def test_recycled_forward_is_bit_identical_on_fork_nets(tmp_path, make):
    """BN/Scale in place, Slice/Concat/ShuffleChannel, Permute/Flatten/PriorBox/Normalize and
    DetectionOutput (tests/test_fork_nets.py's nets)."""
    import test_fork_nets

    path = tmp_path / f"{make}.prototxt"
    path.write_text(getattr(test_fork_nets, make)())
    net = Net(str(path), engine.TEST, rng=np.random.default_rng(0))
    test_fork_nets.randomize(net, 4)
    inputs = {n: np.random.default_rng(5).standard_normal(net.blobs[n].shape)
              for n in net.inputs}
    plain = {k: v.copy() for k, v in net.forward(**inputs).items()}
    net.recycle_memory()
    assert net._recycle.roots
    for _ in range(2):
        for name, value in net.forward(**inputs).items():
            assert np.array_equal(value, plain[name]), name


def test_importing_engine_and_solvers_loads_no_hdf5_library():
    """h5py (~13 MB resident) loads only when an HDF5 file is read or written."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = "import sys, engine, solvers; print('h5py' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=repo, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
                          check=True)
    assert done.stdout.strip() == "False"
