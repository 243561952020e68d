"""Learning-rate policies against Caffe's formulas, and multistep's stateful step."""

from __future__ import annotations

import logging
import math

import pytest
from google.protobuf import text_format

from engine import caffe_pb2
from engine.errors import SolverError
from solvers import LR_POLICIES
from solvers.lr_policies import learning_rate


def solver_param(text: str) -> caffe_pb2.SolverParameter:
    return text_format.Parse(text, caffe_pb2.SolverParameter())


BASE = "base_lr: 0.1 "


@pytest.mark.parametrize("policy, fields, it, expected", [
    ("fixed", "", 0, 0.1),
    ("fixed", "", 1000, 0.1),
    ("step", "gamma: 0.5 stepsize: 10", 0, 0.1),
    ("step", "gamma: 0.5 stepsize: 10", 9, 0.1),
    ("step", "gamma: 0.5 stepsize: 10", 10, 0.05),
    ("step", "gamma: 0.5 stepsize: 10", 35, 0.1 * 0.5**3),
    ("exp", "gamma: 0.99", 0, 0.1),
    ("exp", "gamma: 0.99", 7, 0.1 * 0.99**7),
    ("inv", "gamma: 0.0001 power: 0.75", 0, 0.1),
    ("inv", "gamma: 0.0001 power: 0.75", 5000, 0.1 * (1 + 0.0001 * 5000) ** -0.75),
    ("multistep", "gamma: 0.1 stepvalue: 3 stepvalue: 6", 2, 0.1),
    ("multistep", "gamma: 0.1 stepvalue: 3 stepvalue: 6", 3, 0.1 * 0.1),
    ("multistep", "gamma: 0.1 stepvalue: 3 stepvalue: 6", 100, 0.1 * 0.01),
    ("poly", "power: 2 max_iter: 100", 0, 0.1),
    ("poly", "power: 2 max_iter: 100", 25, 0.1 * 0.75**2),
    ("poly", "power: 0.5 max_iter: 100", 100, 0.0),
    ("sigmoid", "gamma: 0.1 stepsize: 50", 50, 0.05),
    ("sigmoid", "gamma: 0.1 stepsize: 50", 0, 0.1 / (1 + math.exp(5.0))),
    ("sigmoid", "gamma: 0.1 stepsize: 50", 80, 0.1 / (1 + math.exp(-3.0))),
])
def test_policy_formula(policy, fields, it, expected):
    p = solver_param(f'{BASE} lr_policy: "{policy}" {fields}')
    # proto fields are float32: compare at float32 precision
    assert LR_POLICIES[policy](p, it) == pytest.approx(expected, rel=1e-6)


def test_multistep_advances_at_most_one_step_per_iteration():
    # Caffe moves current_step by one per update; a repeated stepvalue costs one more update
    p = solver_param(f'{BASE} lr_policy: "multistep" gamma: 0.5 '
                     "stepvalue: 2 stepvalue: 4 stepvalue: 4 stepvalue: 7")
    steps, rates, current = [], [], 0
    for it in range(9):
        rate, current = learning_rate(p, it, current)
        steps.append(current)
        rates.append(rate)
    assert steps == [0, 0, 1, 1, 2, 3, 3, 4, 4]
    assert rates == pytest.approx([0.1 * 0.5**s for s in steps], rel=1e-6)


def test_multistep_resumed_late_catches_up_one_step_at_a_time():
    p = solver_param(f'{BASE} lr_policy: "multistep" gamma: 0.1 stepvalue: 1 stepvalue: 2')
    _, current = learning_rate(p, 50, 0)
    assert current == 1
    _, current = learning_rate(p, 51, current)
    assert current == 2


def test_step_policy_recomputes_current_step():
    p = solver_param(f'{BASE} lr_policy: "step" gamma: 0.5 stepsize: 3')
    assert learning_rate(p, 7, 0)[1] == 2


def test_solver_logs_the_rate_it_uses(make_solver, caplog):
    solver = make_solver('base_lr: 0.1 lr_policy: "multistep" gamma: 0.5 stepvalue: 1 '
                         "stepvalue: 2 display: 1 max_iter: 4")
    with caplog.at_level(logging.INFO, logger="solvers"):
        solver.step(3)
    lrs = [r.getMessage() for r in caplog.records if ", lr = " in r.getMessage()]
    assert lrs == ["Iteration 0, lr = 0.1", "Iteration 1, lr = 0.05", "Iteration 2, lr = 0.025"]
    assert "MultiStep Status: Iteration 2, step = 2" in [r.getMessage() for r in caplog.records]
    assert solver.current_step == 2


@pytest.mark.parametrize("text, match", [
    ('lr_policy: "cosine"', "Unknown learning rate policy: 'cosine'"),
    ("", "Unknown learning rate policy: ''"),
    ('lr_policy: "step" gamma: 0.1', "stepsize must be > 0"),
    ('lr_policy: "sigmoid" gamma: -1 stepsize: 3', "gamma must be >= 0"),
    ('lr_policy: "poly" power: 1', "max_iter must be > 0"),
    ('lr_policy: "poly" power: 0.5 max_iter: 1', "iteration 2 is past max_iter 1"),
])
def test_bad_policies(text, match):
    p = solver_param(BASE + text)
    with pytest.raises(SolverError, match=match):
        learning_rate(p, 2, 0)
