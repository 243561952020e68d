"""Each update rule, weight decay, clipping, iter_size and lr_mult against hand computation.

The net is least squares (tests/solvers/conftest.py), run in float64 so the hand-computed numpy
updates must agree to rounding.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from solver_nets import LS_X, ls_gradients, ls_net, params_of

LR = 0.01


def f32(value: float) -> float:
    """SolverParameter's float fields hold float32 values."""
    return float(np.float32(value))


M, M2, D8, D6, RMS = f32(0.9), f32(0.999), f32(1e-8), f32(1e-6), f32(0.95)


def sgd(st, g, lr, t, m=M):
    st["v"] = m * st.get("v", 0.0) + lr * g
    return st["v"]


def nesterov(st, g, lr, t, m=M):
    v_prev = st.get("v", 0.0)
    st["v"] = m * v_prev + lr * g
    return (1 + m) * st["v"] - m * v_prev


def adagrad(st, g, lr, t, delta=D8):
    st["h"] = st.get("h", 0.0) + g * g
    return lr * g / (np.sqrt(st["h"]) + delta)


def rmsprop(st, g, lr, t, d=RMS, delta=D8):
    st["h"] = d * st.get("h", 0.0) + (1 - d) * g * g
    return lr * g / (np.sqrt(st["h"]) + delta)


def adadelta(st, g, lr, t, m=M, delta=D6):
    st["g2"] = m * st.get("g2", 0.0) + (1 - m) * g * g
    u = g * np.sqrt((st.get("u2", 0.0) + delta) / (st["g2"] + delta))
    st["u2"] = m * st.get("u2", 0.0) + (1 - m) * u * u
    return lr * u


def adam(st, g, lr, t, b1=M, b2=M2, delta=D8):
    st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * g
    st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * g * g
    correction = np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
    return lr * correction * st["m"] / (np.sqrt(st["v"]) + delta)


RULES = [
    ("SGD", "momentum: 0.9", sgd, ["v"]),
    ("Nesterov", "momentum: 0.9", nesterov, ["v"]),
    ("AdaGrad", "", adagrad, ["h"]),
    ("RMSProp", "rms_decay: 0.95", rmsprop, ["h"]),
    ("AdaDelta", "momentum: 0.9 delta: 1e-6", adadelta, ["g2", "u2"]),
    ("Adam", "momentum: 0.9 momentum2: 0.999", adam, ["m", "v"]),
]


def hand_run(rule, w, b, lrs):
    """The rule applied by hand to the least-squares problem; returns params and states."""
    params, states = [w.copy(), b.copy()], [{}, {}]
    for t, lr in enumerate(lrs):
        grads = ls_gradients(*params)
        for i in range(2):
            params[i] = params[i] - rule(states[i], grads[i], lr, t)
    return params, states


@pytest.mark.parametrize("type_, fields, rule, _", RULES)
def test_first_two_updates_match_hand_computation(make_solver, type_, fields, rule, _):
    # the rate halves after the first update, which also checks SGD folds lr into its history
    solver = make_solver(f'type: "{type_}" base_lr: {LR} lr_policy: "step" gamma: 0.5 '
                         f"stepsize: 1 max_iter: 2 {fields}")
    w0, b0 = params_of(solver)
    for n_steps in (1, 2):
        solver.step(1)
        expected, _ = hand_run(rule, w0, b0, [f32(LR) * 0.5**t for t in range(n_steps)])
        for got, want in zip(params_of(solver), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert solver.iter == 2


@pytest.mark.parametrize("type_, fields, rule, names", RULES)
def test_history_holds_the_rules_state(make_solver, type_, fields, rule, names):
    solver = make_solver(f'type: "{type_}" base_lr: {LR} lr_policy: "fixed" {fields}')
    w0, b0 = params_of(solver)
    solver.step(2)
    _, states = hand_run(rule, w0, b0, [f32(LR), f32(LR)])
    assert len(solver.state_names) == len(names)
    for i in range(2):
        for ours, theirs in zip(solver.state_names, names, strict=True):
            np.testing.assert_allclose(solver.state[i][ours], states[i][theirs], rtol=1e-12)


@pytest.mark.parametrize("reg", ["L2", "L1"])
def test_weight_decay_uses_decay_mult(make_solver, reg):
    net = ls_net("param { decay_mult: 2 } param { decay_mult: 0 }")
    solver = make_solver(f'base_lr: {LR} lr_policy: "fixed" weight_decay: 0.05 '
                         f'regularization_type: "{reg}"', net)
    w, b = params_of(solver)
    solver.step(1)
    dw, db = ls_gradients(w, b)
    decay = w if reg == "L2" else np.sign(w)
    np.testing.assert_allclose(solver.net.learnable_params[0].data,
                               w - f32(LR) * (dw + f32(0.05) * 2 * decay), rtol=1e-12)
    np.testing.assert_allclose(solver.net.learnable_params[1].data, b - f32(LR) * db, rtol=1e-12)


def test_iter_size_averages_the_accumulated_gradient(make_solver):
    solver = make_solver(f'base_lr: {LR} lr_policy: "fixed" iter_size: 3')
    w, b = params_of(solver)
    solver.step(1)
    dw, db = ls_gradients(w, b)  # the same batch three times: the mean is one batch's gradient
    np.testing.assert_allclose(params_of(solver)[0], w - f32(LR) * dw, rtol=1e-12)
    np.testing.assert_allclose(params_of(solver)[1], b - f32(LR) * db, rtol=1e-12)
    r = LS_X @ w.T + b - solver.net.blobs["y"].data
    assert solver.smoothed_loss == pytest.approx(np.sum(r**2) / (2 * len(r)), rel=1e-12)


def test_clipping_happens_before_the_iter_size_division(make_solver, caplog):
    solver = make_solver(f'base_lr: {LR} lr_policy: "fixed" iter_size: 2')
    w, b = params_of(solver)
    dw, db = ls_gradients(w, b)
    norm = np.sqrt(np.sum(dw**2) + np.sum(db**2))
    # the summed gradient (2 * norm) exceeds the cap, the averaged one (norm) does not
    solver.param.clip_gradients = 1.5 * norm
    clip = solver.param.clip_gradients  # a float32 field
    with caplog.at_level(logging.INFO, logger="solvers"):
        solver.step(1)
    scale = clip / (2 * norm)
    np.testing.assert_allclose(params_of(solver)[0], w - f32(LR) * dw * scale, rtol=1e-12)
    np.testing.assert_allclose(params_of(solver)[1], b - f32(LR) * db * scale, rtol=1e-12)
    assert any(r.getMessage().startswith("Gradient clipping: scaling down gradients (L2 norm ")
               and " by scale factor " in r.getMessage() for r in caplog.records)


def test_clipping_leaves_small_gradients_alone(make_solver):
    solver = make_solver(f'base_lr: {LR} lr_policy: "fixed" clip_gradients: 1e6')
    w, b = params_of(solver)
    solver.step(1)
    dw, _ = ls_gradients(w, b)
    np.testing.assert_allclose(params_of(solver)[0], w - f32(LR) * dw, rtol=1e-12)


TWO_LAYER = """
name: "two"
layer { name: "data" type: "Input" top: "x" top: "y"
  input_param { shape { dim: 6 dim: 3 } shape { dim: 6 dim: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h" %s
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "out"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


def test_lr_mult_zero_layer_is_bit_identical_after_training(make_solver):
    net = TWO_LAYER % "param { lr_mult: 0 } param { lr_mult: 0 }"
    solver = make_solver('base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01',
                         net, dtype=np.float32)
    frozen = [b.data.copy() for b in solver.net.params["ip1"]]
    trained = solver.net.params["ip2"][0].data.copy()
    solver.step(5)
    for before, blob in zip(frozen, solver.net.params["ip1"], strict=True):
        assert np.array_equal(before, blob.data)
    assert not np.array_equal(trained, solver.net.params["ip2"][0].data)


def test_lr_mult_ten_takes_ten_times_the_step(make_solver):
    text = 'base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 random_seed: 7'
    base = make_solver(text, TWO_LAYER % "param { lr_mult: 1 } param { lr_mult: 1 }")
    fast = make_solver(text, TWO_LAYER % "param { lr_mult: 10 } param { lr_mult: 10 }",
                       name="fast")
    before = [b.data.copy() for b in base.net.params["ip1"]]
    for blob, start in zip(fast.net.params["ip1"], before, strict=True):
        assert np.array_equal(blob.data, start)  # same seed, same initial weights
    base.step(1)
    fast.step(1)
    for start, slow_blob, fast_blob in zip(before, base.net.params["ip1"],
                                           fast.net.params["ip1"], strict=True):
        np.testing.assert_allclose(fast_blob.data - start, 10 * (slow_blob.data - start),
                                   rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(base.net.params["ip2"][0].data, fast.net.params["ip2"][0].data)


def test_diff_holds_the_applied_step_as_in_caffe(make_solver):
    solver = make_solver(f'base_lr: {LR} lr_policy: "fixed" momentum: 0.9')
    w, _ = params_of(solver)
    solver.step(1)
    np.testing.assert_allclose(solver.net.learnable_params[0].diff, w - params_of(solver)[0],
                               rtol=1e-12)


def test_float32_nets_train_in_float32(make_solver):
    solver = make_solver('type: "Adam" base_lr: 0.01 lr_policy: "fixed"', dtype=np.float32)
    solver.step(2)
    for blob in solver.net.learnable_params:
        assert blob.data.dtype == np.float32
    for per_param in solver.state:
        assert all(a.dtype == np.float32 for a in per_param.values())


@pytest.mark.parametrize(("type_", "fields", "rule", "names"), RULES)
@pytest.mark.parametrize("extra", ["weight_decay: 0.01", 'weight_decay: 0.02 regularization_type: '
                                   '"L1" iter_size: 2 clip_gradients: 0.1'])
def test_chunked_update_is_bit_identical_to_the_per_param_one(make_solver, monkeypatch, type_,
                                                              fields, rule, names, extra):
    """The elementwise update on small chunks (most params split across chunks) gives the
    per-param update's bits: params, diffs and history."""
    import solvers.solver as solver_module

    net = TWO_LAYER % "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }"
    text = f'type: "{type_}" base_lr: 0.05 lr_policy: "fixed" random_seed: 7 {fields} {extra}'
    runs = []
    for chunked in (False, True):
        monkeypatch.setattr(solver_module.Solver, "_elementwise", lambda self, c=chunked: c)
        monkeypatch.setattr(solver_module, "UPDATE_CHUNK", 3)
        solver = make_solver(text, net, dtype=np.float32, name=f"s{chunked}")
        solver.step(3)
        runs.append(solver)
    plain, chunked_run = runs
    for a, b in zip(plain.net.learnable_params, chunked_run.net.learnable_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.diff, b.diff)
    for a, b in zip(plain.state, chunked_run.state, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
