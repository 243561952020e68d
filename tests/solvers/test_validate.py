"""A solver is checked before any net is built; a failed run leaves no snapshot folder behind."""

from __future__ import annotations

import logging

import pytest
from google.protobuf import text_format
from solver_nets import ls_net

import solvers.solver
from engine import caffe_pb2
from engine.cli import main
from engine.errors import SolverError
from solvers import get_solver
from solvers.validate import validate_solver_param

GOOD = 'base_lr: 0.01 lr_policy: "fixed" max_iter: 4 '


@pytest.fixture
def no_nets(monkeypatch):
    """Counts Net constructions in the solver module (a test asserts there were none)."""
    built = []

    def fake_net(*args, **kwargs):
        built.append(args)
        raise AssertionError("a net was built before the solver was validated")

    monkeypatch.setattr(solvers.solver, "Net", fake_net)
    return built


def write(tmp_path, text: str, name: str = "solver.prototxt") -> str:
    (tmp_path / "net.prototxt").write_text(ls_net())
    path = tmp_path / name
    path.write_text(f'net: "{tmp_path / "net.prototxt"}"\n{text}')
    return str(path)


def test_missing_stepsize_fails_without_building_a_net(tmp_path, no_nets):
    path = write(tmp_path, 'base_lr: 0.01 lr_policy: "step" gamma: 0.1 max_iter: 10')
    with pytest.raises(SolverError, match=r"lr_policy 'step' needs stepsize"):
        get_solver(path)
    assert no_nets == []


def test_cli_missing_stepsize_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys,
                                                               no_nets):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'base_lr: 0.01 lr_policy: "step" gamma: 0.1 max_iter: 10 snapshot: 5 '
          'snapshot_prefix: "runs/new/ls"')
    assert main(["train", "-solver", "solver.prototxt"]) == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("engine: error")]
    assert len(errors) == 1 and "stepsize" in errors[0] and "solver.prototxt" in errors[0]
    assert no_nets == []
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_building_its_net_leaves_no_snapshot_folder(tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, GOOD + 'snapshot: 2 snapshot_prefix: "runs/ls"')
    (tmp_path / "net.prototxt").write_text(ls_net().replace('"EuclideanLoss"', '"Nope"'))
    assert main(["train", "solver.prototxt"]) == 1
    assert "Nope" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_engine_train_creates_the_folder_at_the_first_snapshot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(ls_net().replace(
        'type: "Input" top: "x" top: "y"\n  input_param { shape { dim: 6 dim: 3 } '
        "shape { dim: 6 dim: 1 } }",
        'type: "DummyData" top: "x" top: "y"\n  dummy_data_param { shape { dim: 6 dim: 3 } '
        "shape { dim: 6 dim: 1 } }"))
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" ' + GOOD + 'snapshot: 2 snapshot_prefix: "runs/a/ls"')
    assert main(["train", "solver.prototxt"]) == 0
    assert (tmp_path / "runs/a/ls_iter_4.caffemodel").is_file()


def test_pycaffe_solver_needs_an_existing_folder_as_caffe(tmp_path):
    path = write(tmp_path, GOOD + f'snapshot: 2 snapshot_prefix: "{tmp_path}/missing/ls"')
    with pytest.raises(SolverError, match=r"Cannot write to snapshot prefix .*does not exist"):
        get_solver(path)


@pytest.mark.parametrize("text, match", [
    ('lr_policy: "step" gamma: 0.1 stepsize: 0', r"'step' needs stepsize > 0 .*got 0"),
    ('lr_policy: "step" stepsize: 10', r"'step' needs gamma"),
    ('lr_policy: "inv" gamma: 0.1', r"'inv' needs power"),
    ('lr_policy: "inv" power: 0.75', r"'inv' needs gamma"),
    ('lr_policy: "multistep" gamma: 0.1', r"needs at least one stepvalue"),
    ('lr_policy: "multistep" gamma: 0.1 stepvalue: 5 stepvalue: 3',
     r"needs increasing stepvalues; got \[5, 3\]"),
    ('lr_policy: "poly" power: 1 max_iter: 0', r"'poly' needs max_iter > 0"),
    ('lr_policy: "sigmoid" gamma: 0.1', r"'sigmoid' needs stepsize"),
    ('lr_policy: "plateau" gamma: 0.5', r"'plateau' needs test_interval > 0"),
    ('lr_policy: "plateau" gamma: 1.5 test_interval: 5', r"needs 0 < gamma < 1"),
    ('lr_policy: "plateau" gamma: 0.5 test_interval: 5 plateau_patience: 0',
     r"plateau_patience >= 1"),
    ('lr_policy: "plateau" gamma: 0.5 test_interval: 5 plateau_mode: "up"', r"plateau_mode"),
    ('lr_policy: "plateau" gamma: 0.5 test_interval: 5 plateau_monitor: "accuracy"',
     r"monitors the test output 'accuracy' but there is no test net"),
    ('lr_policy: "fixed" warmup_start_lr: 0.001', r"warmup_iter is 0"),
    ('lr_policy: "fixed" warmup_iter: -1', r"warmup_iter must be >= 0"),
    ('lr_policy: "fixed" momentum: 1.0', r"SGD needs 0 <= momentum < 1; got 1"),
    ('lr_policy: "fixed" type: "Nesterov" momentum: -0.1', r"Nesterov needs 0 <= momentum"),
    ('lr_policy: "fixed" type: "Adam" momentum: 0.9 momentum2: 1', r"beta2 \(momentum2\) < 1"),
    ('lr_policy: "fixed" type: "Adam" momentum: 1 momentum2: 0.999', r"beta1 \(momentum\) < 1"),
    ('lr_policy: "fixed" type: "AdaDelta" momentum: 0.95 delta: 0', r"AdaDelta needs delta > 0"),
    ('lr_policy: "fixed" type: "AdaGrad" delta: -1', r"AdaGrad needs delta > 0"),
    ('lr_policy: "fixed" display: -1', r"display should be >= 0"),
    ('lr_policy: "fixed" base_lr: -1', r"base_lr must be a finite number >= 0"),
    ('lr_policy: "fixed" max_iter: -1', r"max_iter should be >= 0"),
    ('lr_policy: "fixed" test_iter: 0 test_interval: 5', r"test_iter #0 must be >= 1"),
])
def test_bad_fields_are_named(tmp_path, no_nets, text, match):
    defaults = " ".join(f for f in ("base_lr: 0.01", "max_iter: 10")
                        if f.split(":")[0] + ":" not in text)
    path = write(tmp_path, f"{defaults} {text}")
    with pytest.raises(SolverError, match=match):
        get_solver(path)
    assert no_nets == []


def test_every_problem_is_listed_in_one_error(tmp_path):
    path = write(tmp_path, 'base_lr: 0.01 lr_policy: "step" type: "Adam" momentum2: 1.5 '
                 "max_iter: -3")
    with pytest.raises(SolverError) as info:
        get_solver(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid solver: ")
    for fragment in ("max_iter should be >= 0", "needs stepsize", "needs gamma", "beta2"):
        assert fragment in message
    assert "\n" not in message


def test_missing_net_file_is_found_before_building(tmp_path, no_nets):
    path = tmp_path / "s.prototxt"
    path.write_text(GOOD + 'net: "nowhere.prototxt"')
    with pytest.raises(SolverError, match=r"net file 'nowhere\.prototxt' not found"):
        get_solver(str(path))


def test_test_interval_without_a_test_net_says_so(tmp_path, caplog):
    param = text_format.Parse(GOOD + f'net: "{write(tmp_path, "")}" test_interval: 5',
                              caffe_pb2.SolverParameter())
    param.net = str(tmp_path / "net.prototxt")
    warnings = validate_solver_param(param)
    assert len(warnings) == 1 and "test_interval is 5 but there is no test net" in warnings[0]
    path = write(tmp_path, GOOD + "test_interval: 5", name="s2.prototxt")
    with caplog.at_level(logging.WARNING, logger="solvers"):
        get_solver(path)
    assert any("nothing will be tested" in r.getMessage() for r in caplog.records)


def test_a_good_solver_has_no_problems(tmp_path):
    param = text_format.Parse(
        GOOD + f'net: "{write(tmp_path, "")}" test_iter: 1 test_interval: 2 type: "Adam" '
        "momentum: 0.9 momentum2: 0.999", caffe_pb2.SolverParameter())
    param.snapshot_prefix = str(tmp_path / "ls")
    assert validate_solver_param(param) == []
