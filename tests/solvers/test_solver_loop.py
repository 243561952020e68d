"""The loop: net construction, Caffe's log lines, solve(), test nets, signals, bad inputs."""

from __future__ import annotations

import logging
import os
import re
import signal

import numpy as np
import pytest
from solver_nets import LS_X, LS_Y, feed, ls_net, params_of

from engine.errors import SolverError
from solvers import get_solver

BASIC = 'base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 random_seed: 3 '

# parse_log.py's regexes (tools/extra in Caffe): our lines must keep matching them
ITERATION = re.compile(r"Iteration (\d+)")
TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "solvers"]


def ls_loss(solver) -> float:
    w, b = params_of(solver)
    r = LS_X @ w.T + b - LS_Y
    return float(np.sum(r**2) / (2 * len(r)))


# -- nets --------------------------------------------------------------------------------------
STAGED = ls_net() + """
layer { name: "extra" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "extra"
  loss_weight: 0 include { stage: "extra" } }
layer { name: "test_only" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "t"
  include { phase: TEST } }
"""


def test_train_and_test_net_states(make_solver):
    solver = make_solver(BASIC + 'test_iter: 1 test_iter: 2 test_interval: 5 '
                         'train_state { stage: "extra" } test_state { stage: "extra" } '
                         "test_state { }", STAGED)
    layer_names = [[layer.name for layer in net.layers] for net in [solver.net, *solver.test_nets]]
    assert "extra" in layer_names[0] and "test_only" not in layer_names[0]
    assert "extra" in layer_names[1] and "test_only" in layer_names[1]
    assert "extra" not in layer_names[2] and "test_only" in layer_names[2]


def test_test_nets_share_the_train_nets_parameters(make_solver):
    solver = make_solver(BASIC + "test_iter: 1 test_interval: 100")
    solver.step(2)
    for blob, test_blob in zip(solver.net.params["ip"], solver.test_nets[0].params["ip"],
                               strict=True):
        assert np.shares_memory(blob.data, test_blob.data)
    scores = solver.test(0)
    assert scores == [("loss", pytest.approx(ls_loss(solver), rel=1e-12))]


def test_net_paths_from_the_working_directory_then_beside_the_solver(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "net.prototxt").write_text(ls_net())
    (tmp_path / "run" / "a.prototxt").write_text(BASIC + 'net: "net.prototxt"')
    (tmp_path / "run" / "b.prototxt").write_text(BASIC + 'net: "run/net.prototxt"')
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        solver = get_solver(f"run/{name}.prototxt")
        assert solver.net.name == "ls"
        assert solver.param.snapshot_prefix == f"run/{name}"  # Caffe's default prefix
    (tmp_path / "run" / "c.prototxt").write_text(BASIC + 'net: "missing.prototxt"')
    with pytest.raises(SolverError, match=r"net file 'missing\.prototxt' not found"):
        get_solver("run/c.prototxt")


def test_inline_net_param_and_solver_parameter_objects(tmp_path):
    from google.protobuf import text_format

    from engine import caffe_pb2

    param = text_format.Parse(BASIC + "net_param {" + ls_net() + "}", caffe_pb2.SolverParameter())
    solver = get_solver(param, dtype=np.float64)
    feed(solver)
    solver.step(1)
    assert solver.iter == 1 and solver.net.name == "ls"
    assert not param.HasField("snapshot_prefix")  # the caller's message is left alone


def test_one_seed_gives_one_initialisation(make_solver):
    a = make_solver(BASIC, name="a")
    b = make_solver(BASIC, name="b")
    unseeded = [make_solver('base_lr: 0.1 lr_policy: "fixed"', name=f"u{i}") for i in range(2)]
    for pa, pb in zip(params_of(a), params_of(b), strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(params_of(unseeded[0])[0], params_of(unseeded[1])[0])


def test_weights_fine_tune_from_caffemodels(make_solver, tmp_path):
    trained = make_solver(BASIC + "snapshot_after_train: true max_iter: 3", name="trained")
    trained.solve()
    model = str(tmp_path / "trained_iter_3.caffemodel")
    hdf5 = make_solver(BASIC + "max_iter: 3 snapshot_format: HDF5", name="h")
    hdf5.solve()
    fresh = make_solver(BASIC.replace("3", "9") + f'weights: "{model}"', name="fresh")
    for got, want in zip(params_of(fresh), params_of(trained), strict=True):
        np.testing.assert_array_equal(got, want)
    # the argument replaces the field, as `caffe train --weights`; comma lists load in order
    both = make_solver(BASIC + f'weights: "{model}"', name="both",
                       weights=f"{model},{tmp_path / 'h_iter_3.caffemodel.h5'}")
    for got, want in zip(params_of(both), params_of(hdf5), strict=True):
        np.testing.assert_array_equal(got, want)


# -- the loop ----------------------------------------------------------------------------------
def test_display_and_test_lines_have_caffes_shape(make_solver, caplog):
    solver = make_solver(BASIC + "display: 2 test_iter: 2 test_interval: 2 max_iter: 4")
    with caplog.at_level(logging.INFO, logger="solvers"):
        solver.step(3)
    lines = messages(caplog)
    assert lines[0] == "Iteration 0, Testing net (#0)"
    assert re.fullmatch(r"    Test net output #0: loss = \S+ \(\* 1 = \S+ loss\)", lines[1])
    assert re.fullmatch(r"Iteration 0 \(\S+ iter/s, \S+s/2 iters\), loss = \S+", lines[2])
    assert re.fullmatch(r"    Train net output #0: loss = \S+ \(\* 1 = \S+ loss\)", lines[3])
    assert lines[4] == "Iteration 0, lr = 0.01"
    assert lines[5] == "Iteration 2, Testing net (#0)"
    assert lines[7].startswith("Iteration 2 (")
    assert [ITERATION.search(lines[k]).group(1) for k in (0, 2, 4, 5)] == ["0", "0", "0", "2"]
    assert TRAIN_OUTPUT.search(lines[3]).group(2) == "loss"
    assert TEST_OUTPUT.search(lines[1]).group(2) == "loss"
    assert LEARNING_RATE.search(lines[4]).group(1) == "0.01"


def test_smoothed_loss_is_the_mean_of_the_last_average_loss_losses(make_solver):
    solver = make_solver(BASIC + "average_loss: 3")
    losses = []
    solver.add_callback(on_gradients_ready=lambda: losses.append(
        float(solver.net.blobs["loss"].data)))
    for k in range(1, 7):
        solver.step(1)  # the window carries across step() calls
        assert solver.smoothed_loss == pytest.approx(np.mean(losses[-3:]), rel=1e-12)
        assert len(solver.losses) == min(k, 3)


def test_solve_snapshots_displays_and_tests_at_the_end(make_solver, tmp_path, caplog):
    solver = make_solver(BASIC + "display: 2 test_iter: 1 test_interval: 2 max_iter: 4 "
                         "test_initialization: false test_compute_loss: true")
    with caplog.at_level(logging.INFO, logger="solvers"):
        solver.solve()
    lines = messages(caplog)
    assert solver.iter == 4
    assert lines[:2] == ["Solving ls", "Learning Rate Policy: fixed"]
    assert "Iteration 0, Testing net (#0)" not in lines
    assert os.path.isfile(tmp_path / "solver_iter_4.caffemodel")
    snap = lines.index(f"Snapshotting to binary proto file {tmp_path / 'solver_iter_4'}"
                       ".caffemodel")
    assert lines[snap + 1] == ("Snapshotting solver state to binary proto file "
                               f"{tmp_path / 'solver_iter_4'}.solverstate")
    assert lines[snap + 2] == f"Iteration 4, loss = {ls_loss(solver):g}"
    assert lines[snap + 3] == "Iteration 4, Testing net (#0)"
    assert lines[snap + 4] == f"Test loss: {ls_loss(solver):g}"
    assert lines[-1] == "Optimization Done."


def test_solve_resumes_and_skips_a_duplicate_final_snapshot(make_solver, tmp_path):
    first = make_solver(BASIC + "max_iter: 4 snapshot: 2", name="s")
    first.solve()
    assert sorted(p for p in os.listdir(tmp_path) if "_iter_" in p) == [
        "s_iter_2.caffemodel", "s_iter_2.solverstate", "s_iter_4.caffemodel",
        "s_iter_4.solverstate"]
    again = make_solver(BASIC + "max_iter: 6 snapshot_after_train: false", name="s2")
    again.solve(str(tmp_path / "s_iter_4.solverstate"))
    assert again.iter == 6
    assert not os.path.exists(tmp_path / "s2_iter_6.caffemodel")


# -- signals -----------------------------------------------------------------------------------
def kill_at(solver, iteration: int, sig: int) -> None:
    def maybe_kill() -> None:
        if solver.iter == iteration:
            os.kill(os.getpid(), sig)

    solver.add_callback(on_gradients_ready=maybe_kill)


def test_sigint_stops_with_a_snapshot_that_resumes(make_solver, tmp_path, caplog):
    text = BASIC + "max_iter: 20"
    solver = make_solver(text)
    previous = signal.getsignal(signal.SIGINT)
    solver.install_signal_handlers()
    kill_at(solver, 3, signal.SIGINT)
    with caplog.at_level(logging.INFO, logger="solvers"):
        solver.solve()
    assert solver.iter == 4  # the update in flight completes
    assert "Optimization stopped early." in messages(caplog)
    assert signal.getsignal(signal.SIGINT) is previous
    straight = make_solver(text, name="straight")
    straight.step(7)
    resumed = make_solver(text, name="resumed")
    resumed.restore(str(tmp_path / "solver_iter_4.solverstate"))
    resumed.step(3)
    for got, want in zip(params_of(resumed), params_of(straight), strict=True):
        np.testing.assert_array_equal(got, want)


def test_sighup_snapshots_and_goes_on(make_solver, tmp_path):
    solver = make_solver(BASIC + "max_iter: 5")
    solver.install_signal_handlers()
    kill_at(solver, 1, signal.SIGHUP)
    solver.solve()
    assert solver.iter == 5
    assert os.path.isfile(tmp_path / "solver_iter_2.solverstate")
    assert os.path.isfile(tmp_path / "solver_iter_5.solverstate")


def test_sigint_during_a_test_interrupts_it(make_solver, tmp_path, caplog):
    solver = make_solver(BASIC + "max_iter: 10 test_iter: 3 test_interval: 2 "
                         "test_initialization: false")
    solver.install_signal_handlers(sigint="stop", sighup="none")
    net = solver.test_nets[0]
    forward = net.forward_from_to

    def forward_then_interrupt(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return forward(*args)

    net.forward_from_to = forward_then_interrupt
    with caplog.at_level(logging.INFO, logger="solvers"):
        solver.solve()
    assert "Test interrupted." in messages(caplog)
    assert solver.iter == 2
    assert os.path.isfile(tmp_path / "solver_iter_2.solverstate")


def test_signal_effect_none_ignores_the_signal(make_solver):
    solver = make_solver(BASIC + "max_iter: 4 snapshot_after_train: false")
    solver.install_signal_handlers(sigint="none")
    kill_at(solver, 1, signal.SIGINT)
    solver.solve()
    assert solver.iter == 4


def test_bad_signal_effect(make_solver):
    solver = make_solver(BASIC)
    with pytest.raises(SolverError, match="signal effect must be one of stop, snapshot, none"):
        solver.install_signal_handlers(sigint="quit")


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ('type: "Momentum"', r"unknown solver type 'Momentum' \(known types: AdaDelta, .*SGD"),
    ('net: "a.prototxt" train_net: "b.prototxt"',
     "exactly one train net .* found \\['net', 'train_net'\\]"),
    ("test_iter: 1", "test_interval must be > 0"),
    ("test_iter: 1 test_interval: 1 test_state { } test_state { }",
     "test_state must be unspecified or specified once per test net"),
    ('type: "AdaGrad" momentum: 0.9', "Momentum cannot be used with AdaGrad"),
    ('type: "RMSProp" momentum: 0.9', "Momentum cannot be used with RMSProp"),
    ('type: "RMSProp" rms_decay: 1.0', "rms_decay should lie between 0 and 1"),
    ('weight_decay: 0.1 regularization_type: "L3"', "Unknown regularization type: 'L3'"),
    ("average_loss: 0", "average_loss should be >= 1"),
    ("iter_size: 0", "iter_size should be >= 1"),
    ('snapshot: 10 snapshot_prefix: "/nonexistent/dir/run"', "Cannot write to snapshot prefix"),
    ('weights: "nowhere.caffemodel"', "weights file 'nowhere.caffemodel' not found"),
])
def test_bad_solver_files(make_solver, text, match):
    with pytest.raises(SolverError, match=match):
        make_solver('base_lr: 0.01 lr_policy: "fixed" ' + text)


def test_no_train_net(tmp_path):
    (tmp_path / "s.prototxt").write_text(BASIC)
    with pytest.raises(SolverError, match="must specify exactly one train net"):
        get_solver(str(tmp_path / "s.prototxt"))


def test_test_iter_without_a_test_net(tmp_path):
    (tmp_path / "net.prototxt").write_text(ls_net())
    (tmp_path / "s.prototxt").write_text(BASIC + 'train_net: "net.prototxt" test_iter: 1 '
                                         "test_interval: 1")
    with pytest.raises(SolverError, match="test_iter must be specified for each test network"):
        get_solver(str(tmp_path / "s.prototxt"))
