"""lr_policy "plateau" and the linear warm-up: rates by hand, and plateau's exact resume."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
from google.protobuf import text_format
from test_snapshot_resume import RESUME_NET, assert_same_solver_state, record

from engine import caffe_pb2
from solvers import get_solver
from solvers.lr_policies import PlateauTracker, learning_rate


def solver_param(text: str) -> caffe_pb2.SolverParameter:
    return text_format.Parse(text, caffe_pb2.SolverParameter())


# -- warm-up -------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, fields, rate_at", [
    ("fixed", "", lambda it: 0.1),
    ("step", "gamma: 0.5 stepsize: 3", lambda it: 0.1 * 0.5 ** (it // 3)),
    ("exp", "gamma: 0.9", lambda it: 0.1 * 0.9**it),
    ("inv", "gamma: 0.1 power: 0.75", lambda it: 0.1 * (1 + 0.1 * it) ** -0.75),
    ("poly", "power: 2 max_iter: 20", lambda it: 0.1 * (1 - it / 20) ** 2),
    ("sigmoid", "gamma: 0.5 stepsize: 6", lambda it: 0.1 / (1 + np.exp(-0.5 * (it - 6)))),
])
def test_warmup_ramps_linearly_to_every_policy(policy, fields, rate_at):
    p = solver_param(f'base_lr: 0.1 lr_policy: "{policy}" {fields} warmup_iter: 8 '
                     "warmup_start_lr: 0.001")
    start = np.float32(0.001)  # a proto float
    current = 0
    for it in range(12):
        rate, current = learning_rate(p, it, current)
        target = rate_at(it)
        expected = start + (target - start) * it / 8 if it < 8 else target
        assert rate == pytest.approx(expected, rel=1e-6), it


def test_warmup_composes_with_multistep_and_its_counter():
    p = solver_param('base_lr: 1 lr_policy: "multistep" gamma: 0.1 stepvalue: 2 stepvalue: 6 '
                     "warmup_iter: 4")
    rates, current = [], 0
    for it in range(8):
        rate, current = learning_rate(p, it, current)
        rates.append(rate)
    # the policy: 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01; ramped from 0 over 4 updates
    expected = [0.0, 1 * 1 / 4, 0.1 * 2 / 4, 0.1 * 3 / 4, 0.1, 0.1, 0.01, 0.01]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert current == 2


def test_warmup_in_the_solver_log(make_solver, caplog):
    solver = make_solver('base_lr: 0.2 lr_policy: "fixed" warmup_iter: 4 warmup_start_lr: 0.1 '
                         "display: 1 max_iter: 6")
    with caplog.at_level(logging.INFO, logger="solvers"):
        solver.step(5)
    lrs = [r.getMessage().split(" = ")[1] for r in caplog.records if ", lr = " in r.getMessage()]
    assert [float(x) for x in lrs] == pytest.approx([0.1, 0.125, 0.15, 0.175, 0.2], rel=1e-6)


# -- plateau -------------------------------------------------------------------------------------
def tracker(mode: str, patience: int = 2, threshold: float = 0.1) -> PlateauTracker:
    p = solver_param(f'lr_policy: "plateau" plateau_patience: {patience} '
                     f"plateau_threshold: {threshold}")
    return PlateauTracker(p, mode)


def test_plateau_tracker_min_and_max():
    t = tracker("min")
    # 10 sets the best; 9.5 is not 10% better; 8.9 is; then two rounds without → drop
    drops = [t.observe(v) for v in (10.0, 9.5, 8.9, 8.5, 8.4, 8.0, 7.0)]
    assert drops == [False, False, False, False, True, False, False]
    assert t.best == 7.0 and t.bad_rounds == 0
    t = tracker("max", patience=1, threshold=0.0)
    assert [t.observe(v) for v in (0.5, 0.6, 0.6, float("nan"), 0.7)] == [
        False, False, True, True, False]


def test_plateau_rates_in_the_solver(make_solver, caplog):
    # a rate far too small to improve the loss: every round after the first is a bad one
    solver = make_solver('base_lr: 1e-12 lr_policy: "plateau" gamma: 0.5 test_interval: 2 '
                         "plateau_patience: 2 display: 1 max_iter: 12")
    with caplog.at_level(logging.INFO, logger="solvers"):
        solver.step(12)
    lrs = [float(r.getMessage().split(" = ")[1]) for r in caplog.records
           if ", lr = " in r.getMessage()]
    # rounds at 2 (best), 4, 6 (drop), 8, 10 (drop)
    drops = [0] * 6 + [1] * 4 + [2] * 2
    assert lrs == pytest.approx([1e-12 * 0.5**d for d in drops], rel=1e-6)
    assert solver.current_step == 2
    assert sum("Plateau: train_loss has not improved" in r.getMessage()
               for r in caplog.records) == 2


def test_plateau_never_goes_below_min_lr(make_solver):
    solver = make_solver('base_lr: 1e-12 lr_policy: "plateau" gamma: 0.1 test_interval: 1 '
                         "plateau_patience: 1 plateau_min_lr: 2e-14 max_iter: 10")
    solver.step(8)
    rate, _ = learning_rate(solver.param, solver.iter, solver.current_step)
    assert solver.current_step >= 3 and rate == pytest.approx(2e-14)


def test_plateau_monitor_must_be_a_test_output(make_solver):
    from engine.errors import SolverError

    with pytest.raises(SolverError, match=r"plateau_monitor 'accuracy' is not an output of test "
                                          r"net #0 .*loss"):
        make_solver('base_lr: 0.1 lr_policy: "plateau" gamma: 0.5 test_interval: 2 test_iter: 1 '
                    'plateau_monitor: "accuracy"')


@pytest.fixture
def plateau_setup(tmp_path):
    rng = np.random.default_rng(5)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = rng.normal(size=(11, 3)).astype(np.float32)
        f["y"] = rng.normal(size=(11, 2)).astype(np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n")
    (tmp_path / "net.prototxt").write_text(RESUME_NET % {"source": tmp_path / "list.txt"})

    def make(monitor: str, extra: str = "", name: str = "solver"):
        path = tmp_path / f"{name}.prototxt"
        path.write_text(
            f'net: "{tmp_path / "net.prototxt"}" type: "SGD" momentum: 0.9 base_lr: 0.05 '
            f'lr_policy: "plateau" gamma: 0.5 plateau_monitor: "{monitor}" plateau_patience: 2 '
            "plateau_threshold: 0.02 warmup_iter: 3 warmup_start_lr: 0.01 test_iter: 2 "
            f"test_interval: 2 average_loss: 3 max_iter: 30 random_seed: 1701 {extra}")
        return get_solver(str(path))

    return make


@pytest.mark.parametrize("monitor", ["train_loss", "loss"])  # the smoothed loss; the test output
def test_plateau_resume_is_bit_identical(plateau_setup, monitor):
    n = 12  # the snapshot falls one bad round into a plateau; the drop comes after it
    straight = plateau_setup(monitor, name="straight")
    straight_losses, straight_tests = record(straight)
    straight.step(2 * n)
    assert straight.current_step >= 1  # the rate did drop

    first = plateau_setup(monitor, f"snapshot: {n}", name="first")
    first_losses, first_tests = record(first)
    first.step(n)
    resumed = plateau_setup(monitor, name="resumed")
    resumed_losses, resumed_tests = record(resumed)
    resumed.restore(f"{first.param.snapshot_prefix}_iter_{n}.solverstate")
    assert (resumed.plateau.best, resumed.plateau.bad_rounds) == (first.plateau.best,
                                                                   first.plateau.bad_rounds)
    assert resumed.plateau.best is not None and resumed.plateau.bad_rounds == 1
    assert resumed.current_step < straight.current_step
    resumed.step(n)

    assert first_losses + resumed_losses == straight_losses
    assert first_tests + resumed_tests == straight_tests
    assert_same_solver_state(straight, resumed)
    assert (resumed.plateau.best, resumed.plateau.bad_rounds) == (straight.plateau.best,
                                                                   straight.plateau.bad_rounds)


def test_plateau_state_in_the_solverstate(plateau_setup, tmp_path):
    solver = plateau_setup("train_loss", "snapshot: 6")
    solver.step(6)
    state = caffe_pb2.SolverState()
    state.ParseFromString((tmp_path / "solver_iter_6.solverstate").read_bytes())
    assert state.moka_resume.plateau_best == solver.plateau.best
    assert state.moka_resume.plateau_bad_rounds == solver.plateau.bad_rounds
    assert state.current_step == solver.current_step
