"""The LSTM example in models/lstm_sequence: its loss falls clearly and training resumes
bit-exactly from a snapshot taken in the middle of a sequence (the LSTM's carried state is part
of the snapshot)."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from engine.io import read_solver_param, write_text
from solvers import get_solver

ROOT = Path(__file__).resolve().parents[1]
SOLVER = "models/lstm_sequence/lstm_solver.prototxt"
TEST_LOSS = re.compile(r"Test net output #0: loss = ([.\deE+-]+)")


@pytest.fixture
def make_solver(tmp_path, monkeypatch):
    """``make(name, **fields) -> Solver``: the shipped solver, snapshots under tmp_path."""
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root

    def make(name: str, **fields):
        param = read_solver_param(SOLVER)
        param.snapshot_prefix = str(tmp_path / name)
        param.snapshot = 0
        for field, value in fields.items():
            setattr(param, field, value)
        path = tmp_path / f"{name}.prototxt"
        write_text(param, path)
        return get_solver(str(path))

    return make


def record(solver) -> tuple[list[float], list]:
    losses, tests = [], []
    solver.add_callback(on_gradients_ready=lambda: losses.append(
        float(solver.net.blobs["loss"].data)))
    run_test = solver.test
    solver.test = lambda i=0: tests.append(run_test(i)) or tests[-1]
    return losses, tests


def test_lstm_example_loss_falls_clearly(make_solver):
    solver = make_solver("fall", max_iter=200)
    losses, tests = record(solver)
    solver.step(200)
    test_losses = [dict(result)["loss"] for result in tests]
    assert len(test_losses) == 2  # iterations 0 and 100
    solver.test()
    final = dict(tests[-1])["loss"]
    with h5py.File(ROOT / "models/lstm_sequence/test.h5", "r") as f:
        data, label = f["data"][()], f["label"][()]
    repeat_last = float(((data - label) ** 2).sum() / (2 * len(data)))  # predict x_t for x_t+1
    assert final < 0.05 * test_losses[0], (test_losses, final)
    assert final < 0.25 * repeat_last, (final, repeat_last)
    assert np.mean(losses[-20:]) < 0.05 * np.mean(losses[:5])


def test_lstm_example_resumes_bit_exactly_mid_sequence(make_solver, tmp_path):
    # 25 batches of 20 steps end half-way through a 40-step wave: the LSTM's state must carry.
    fields = {"max_iter": 50, "test_interval": 20}
    straight = make_solver("straight", **fields)
    straight_losses, straight_tests = record(straight)
    straight.step(50)

    first = make_solver("first", snapshot=25, **fields)
    first_losses, first_tests = record(first)
    first.step(25)
    resumed = make_solver("resumed", **fields)
    resumed_losses, resumed_tests = record(resumed)
    resumed.restore(str(tmp_path / "first_iter_25.solverstate"))
    assert resumed.net.layer_dict["lstm"].carried is not None
    resumed.step(25)

    assert first_losses + resumed_losses == straight_losses
    assert first_tests + resumed_tests == straight_tests
    for a, b in zip(straight.net.learnable_params, resumed.net.learnable_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    for sa, sb in zip(straight.state, resumed.state, strict=True):
        for name in straight.state_names:
            np.testing.assert_array_equal(sa[name], sb[name])

    forgetful = make_solver("forgetful", **fields)
    forgetful_losses, _ = record(forgetful)
    forgetful.restore(str(tmp_path / "first_iter_25.solverstate"))
    forgetful.net.layer_dict["lstm"].reset()  # without the carried state the run differs
    forgetful.step(1)
    assert forgetful_losses[0] != resumed_losses[0]
