"""Snapshots: exact resume for every rule, Caffe's file layout, atomic writes, moved folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine import caffe_pb2
from engine.data import array_to_datum, write_lmdb
from engine.errors import MokaError, SolverError
from solvers import SOLVERS, get_solver

# Shuffled HDF5 rows (11 rows, batch 4: snapshots land mid-epoch), gaussian noise from the
# shared generator, dropout, and a test net whose data layer keeps its own position.
RESUME_NET = """
name: "resume"
layer { name: "data" type: "HDF5Data" top: "x" top: "y"
  hdf5_data_param { source: "%(source)s" batch_size: 4 shuffle: true } }
layer { name: "noise" type: "DummyData" top: "n"
  dummy_data_param { shape { dim: 4 dim: 3 } data_filler { type: "gaussian" std: 0.1 } } }
layer { name: "xn" type: "Eltwise" bottom: "x" bottom: "n" top: "xn" }
layer { name: "ip1" type: "InnerProduct" bottom: "xn" top: "h"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "drop" type: "Dropout" bottom: "h" top: "h" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "out"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""

RULE_FIELDS = {
    "SGD": "momentum: 0.9",
    "Nesterov": "momentum: 0.9",
    "AdaGrad": "",
    "RMSProp": "rms_decay: 0.9",
    "AdaDelta": "momentum: 0.9 delta: 1e-6",
    "Adam": "momentum: 0.9 momentum2: 0.999",
}


@pytest.fixture
def resume_setup(tmp_path):
    """Writes the data and net; returns ``make(type, extra="", name="solver") -> Solver``."""
    rng = np.random.default_rng(11)
    files = []
    for name, rows in (("a.h5", 5), ("b.h5", 6)):
        with h5py.File(tmp_path / name, "w") as f:
            f["x"] = rng.normal(size=(rows, 3)).astype(np.float32)
            f["y"] = rng.normal(size=(rows, 2)).astype(np.float32)
        files.append(str(tmp_path / name))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(files) + "\n")
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(RESUME_NET % {"source": listing})

    def make(type_: str, extra: str = "", name: str = "solver", net: str | None = None):
        text = (f'net: "{net or net_path}" type: "{type_}" {RULE_FIELDS[type_]} base_lr: 0.05 '
                'lr_policy: "multistep" gamma: 0.5 stepvalue: 3 stepvalue: 7 '
                "weight_decay: 0.001 test_iter: 2 test_interval: 3 average_loss: 3 "
                f"max_iter: 10 random_seed: 1701 {extra}")
        path = tmp_path / f"{name}.prototxt"
        path.write_text(text)
        return get_solver(str(path))

    return make


def record(solver) -> tuple[list[float], list]:
    """Per-iteration train losses and every test result of ``solver``."""
    losses, tests = [], []
    solver.add_callback(on_gradients_ready=lambda: losses.append(
        float(solver.net.blobs["loss"].data)))
    run_test = solver.test
    solver.test = lambda i=0: tests.append(run_test(i)) or tests[-1]
    return losses, tests


def assert_same_solver_state(a, b) -> None:
    assert a.iter == b.iter and a.current_step == b.current_step
    for pa, pb in zip(a.net.learnable_params, b.net.learnable_params, strict=True):
        np.testing.assert_array_equal(pa.data, pb.data)
    for sa, sb in zip(a.state, b.state, strict=True):
        for name in a.state_names:
            np.testing.assert_array_equal(sa[name], sb[name])
    assert a.losses == b.losses and a.loss_index == b.loss_index
    assert a.smoothed_loss == b.smoothed_loss
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


@pytest.mark.parametrize("type_", list(SOLVERS))
def test_resume_is_bit_identical_to_an_uninterrupted_run(resume_setup, type_):
    straight = resume_setup(type_, name="straight")
    straight_losses, straight_tests = record(straight)
    straight.step(10)

    first = resume_setup(type_, "snapshot: 5", name="first")
    first_losses, first_tests = record(first)
    first.step(5)
    resumed = resume_setup(type_, name="resumed")
    resumed_losses, resumed_tests = record(resumed)
    resumed.restore(str(first.param.snapshot_prefix) + "_iter_5.solverstate")
    assert resumed.iter == 5 and resumed.current_step == 1
    resumed.step(5)

    assert first_losses + resumed_losses == straight_losses
    assert first_tests + resumed_tests == straight_tests
    assert_same_solver_state(straight, resumed)


def test_solverstate_has_caffes_fields_and_history_order(resume_setup, tmp_path):
    solver = resume_setup("Adam", "snapshot: 4")
    solver.step(4)
    prefix = str(tmp_path / "solver")
    assert os.path.isfile(prefix + "_iter_4.caffemodel")
    state = caffe_pb2.SolverState()
    state.ParseFromString(Path(prefix + "_iter_4.solverstate").read_bytes())
    assert state.iter == 4 and state.current_step == 1
    assert state.learned_net == prefix + "_iter_4.caffemodel"
    n = len(solver.net.learnable_params)
    assert len(state.history) == 2 * n
    for k, blob in enumerate(state.history):  # first all m, then all v
        name, i = ("m", "v")[k // n], k % n
        assert tuple(blob.shape.dim) == solver.state[i][name].shape
        np.testing.assert_array_equal(np.asarray(blob.data, np.float32),
                                      solver.state[i][name].ravel())
    model = caffe_pb2.NetParameter()
    model.ParseFromString(Path(prefix + "_iter_4.caffemodel").read_bytes())
    ip1 = next(layer for layer in model.layer if layer.name == "ip1")
    np.testing.assert_array_equal(np.asarray(ip1.blobs[0].data, np.float32),
                                  solver.net.params["ip1"][0].data.ravel())
    assert not ip1.blobs[0].diff  # snapshot_diff is off


def test_a_caffe_solverstate_without_moka_fields_restores(resume_setup, tmp_path):
    solver = resume_setup("SGD", "snapshot: 4")
    solver.step(4)
    path = str(tmp_path / "solver_iter_4.solverstate")
    state = caffe_pb2.SolverState()
    state.ParseFromString(Path(path).read_bytes())
    state.ClearField("moka_resume")
    state.ClearField("moka_sha256")  # a Caffe file has neither
    Path(path).write_bytes(state.SerializeToString())
    other = resume_setup("SGD", name="other")
    other.restore(path)
    assert other.iter == 4 and other.losses == []
    for a, b in zip(solver.net.learnable_params, other.net.learnable_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(solver.state[0]["history"], other.state[0]["history"])


def test_hdf5_snapshots_use_caffes_layout_and_resume_exactly(resume_setup, tmp_path):
    straight = resume_setup("Adam", name="straight")
    straight.step(8)
    first = resume_setup("Adam", "snapshot: 5 snapshot_format: HDF5 snapshot_diff: true",
                         name="first")
    first.step(5)
    prefix = str(tmp_path / "first_iter_5")
    with h5py.File(prefix + ".caffemodel.h5", "r") as f:
        assert set(f) == {"data", "diff"}
        assert set(f["data/ip1"]) == {"0", "1"} and set(f["data/relu"]) == set()
        np.testing.assert_array_equal(f["data/ip2/0"][()], first.net.params["ip2"][0].data)
    with h5py.File(prefix + ".solverstate.h5", "r") as f:
        assert int(f["iter"][0]) == 5 and int(f["current_step"][0]) == 1
        assert f["learned_net"][()].rstrip(b"\0").decode() == prefix + ".caffemodel.h5"
        assert len(f["history"]) == 2 * len(first.net.learnable_params)
    resumed = resume_setup("Adam", name="resumed")
    resumed.restore(prefix + ".solverstate.h5")
    resumed.step(3)
    assert_same_solver_state(straight, resumed)


def test_restore_from_a_moved_snapshot_folder(resume_setup, tmp_path):
    os.mkdir(tmp_path / "run")
    solver = resume_setup("Nesterov", f'snapshot: 3 snapshot_prefix: "{tmp_path / "run"}"')
    solver.step(3)
    assert os.path.isfile(tmp_path / "run" / "solver_iter_3.solverstate")  # folder → stem
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    resumed = resume_setup("Nesterov", name="resumed")
    resumed.restore(str(tmp_path / "moved" / "solver_iter_3.solverstate"))
    assert_same_solver_state(solver, resumed)


def test_restoring_a_caffemodel_explains_what_to_give(resume_setup, tmp_path):
    solver = resume_setup("SGD", "snapshot: 2")
    solver.step(2)
    with pytest.raises(SolverError, match=r"Incorrect length of history blobs.*expects 4, found "
                                          r"0.*\.solverstate"):
        solver.restore(str(tmp_path / "solver_iter_2.caffemodel"))


def test_restoring_another_rules_state_is_refused(resume_setup, tmp_path):
    solver = resume_setup("Adam", "snapshot: 2")
    solver.step(2)
    sgd = resume_setup("SGD", name="sgd")
    with pytest.raises(SolverError, match="SGD solver expects 4, found 8"):
        sgd.restore(str(tmp_path / "solver_iter_2.solverstate"))


def test_a_failed_snapshot_keeps_the_previous_files(resume_setup, tmp_path, monkeypatch):
    solver = resume_setup("SGD")
    solver.step(2)
    model, state = solver.snapshot()
    good = (Path(model).read_bytes(), Path(state).read_bytes())
    solver.step(1)
    solver.iter = 2  # the same file names again

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(MokaError):
        solver.snapshot()
    monkeypatch.undo()
    assert (Path(model).read_bytes(), Path(state).read_bytes()) == good
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["a.h5", "b.h5", "list.txt", "net.prototxt", "solver.prototxt",
         "solver_iter_2.caffemodel", "solver_iter_2.solverstate"])


def test_a_failed_hdf5_snapshot_keeps_the_previous_files(resume_setup, tmp_path, monkeypatch):
    from solvers import snapshot as snapshots

    solver = resume_setup("SGD", "snapshot_format: HDF5")
    solver.step(1)
    model, _ = solver.snapshot()
    good = Path(model).read_bytes()

    def half_written(net, path, write_diff):
        with h5py.File(path, "w") as f:
            f.create_group("data")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(snapshots, "_write_net_hdf5", half_written)
    with pytest.raises(SolverError, match=r"cannot write .*\.caffemodel\.h5: Input/output error"):
        solver.snapshot()
    assert Path(model).read_bytes() == good
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_multistep_position_is_saved_in_current_step(resume_setup, tmp_path):
    solver = resume_setup("SGD", "snapshot: 8")
    solver.step(8)
    state = caffe_pb2.SolverState()
    state.ParseFromString(Path(tmp_path / "solver_iter_8.solverstate").read_bytes())
    assert state.current_step == 2


def crop_net(tmp_path) -> str:
    images = np.random.default_rng(2).integers(0, 256, (7, 2, 5, 5), dtype=np.uint8)
    write_lmdb(str(tmp_path / "db"), [(b"%03d" % i, array_to_datum(im, i % 2).SerializeToString())
                                      for i, im in enumerate(images)])
    net = f"""
name: "crop"
layer {{ name: "data" type: "Data" top: "x" top: "label"
  transform_param {{ crop_size: 3 mirror: true scale: 0.01 }}
  data_param {{ source: "{tmp_path / 'db'}" backend: LMDB batch_size: 3 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "out"
  inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "drop" type: "Dropout" bottom: "out" top: "out" }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "out" bottom: "label" top: "loss" }}
"""
    path = tmp_path / "crop.prototxt"
    path.write_text(net)
    return str(path)


def test_resume_with_random_crops_and_mirrors(resume_setup, tmp_path):
    net = crop_net(tmp_path)
    straight = resume_setup("RMSProp", name="straight", net=net)
    straight.step(6)
    first = resume_setup("RMSProp", "snapshot: 4", name="first", net=net)
    first.step(4)
    resumed = resume_setup("RMSProp", name="resumed", net=net)
    resumed.restore(str(tmp_path / "first_iter_4.solverstate"))
    resumed.step(2)
    assert_same_solver_state(straight, resumed)


@pytest.mark.parametrize("prefetching", [True, False], ids=["prefetch", "no-prefetch"])
def test_resume_is_exact_with_data_prefetching_on_or_off(resume_setup, tmp_path, prefetching):
    """Snapshots taken while the Data layer (and the HDF5Data of the default net) holds a
    prefetched batch; the resumed run and an uninterrupted one match, and the two settings
    train the same."""
    from engine.data import prefetch

    previous = prefetch.set_enabled(prefetching)
    try:
        net = crop_net(tmp_path)
        straight = resume_setup("SGD", name="straight", net=net)
        straight.step(6)
        first = resume_setup("SGD", "snapshot: 3", name="first", net=net)
        first.step(3)
        assert first.net.layers[0].prefetch.pending == prefetching
        resumed = resume_setup("SGD", name="resumed", net=net)
        resumed.step(1)  # a prefetched batch at another position, dropped by the restore
        resumed.restore(str(tmp_path / "first_iter_3.solverstate"))
        resumed.step(3)
        assert_same_solver_state(straight, resumed)
    finally:
        prefetch.set_enabled(previous)
    other = resume_setup("SGD", name="other", net=net)
    other.step(6)  # with the default setting
    for a, b in zip(straight.net.learnable_params, other.net.learnable_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("dims, values, message", [
    ([2, 3], [1.0, 2.0], r"history blob 1 declares shape \(2, 3\) \(6 values\) but holds 2"),
    ([-2], [], r"history blob 1: .*the file is corrupt"),
])
def test_a_caffe_state_with_a_damaged_history_blob_is_refused_naming_it(tmp_path, dims, values,
                                                                         message):
    from solvers.snapshot import read_state

    state = caffe_pb2.SolverState(iter=3)
    state.history.add().CopyFrom(caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[1]),
                                                     data=[0.5]))
    state.history.add().CopyFrom(caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=dims),
                                                     data=values))
    path = tmp_path / "caffe_iter_3.solverstate"
    path.write_bytes(state.SerializeToString())
    with pytest.raises(SolverError, match=r"caffe_iter_3\.solverstate: " + message):
        read_state(str(path))
