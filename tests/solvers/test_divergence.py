"""NaN/Inf stops training with the layer named; debug_info prints Caffe's lines."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from solver_nets import LS_X, LS_Y

from engine.cli import main
from engine.debug_info import mean_abs
from solvers import get_solver
from solvers.divergence import DivergenceError, diagnose

MLP = """
name: "mlp"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 8 dim: 5 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "%(middle)s" type: "%(middle_type)s" bottom: "h" top: "h2" %(middle_param)s }
layer { name: "ip2" type: "InnerProduct" bottom: "h2" top: "y"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def mlp(middle: str = "relu", middle_type: str = "ReLU", middle_param: str = "") -> str:
    return MLP % {"middle": middle, "middle_type": middle_type, "middle_param": middle_param}


def solver(tmp_path, net: str, extra: str = "", base_lr: float = 0.1):
    (tmp_path / "net.prototxt").write_text(net)
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "{tmp_path / "net.prototxt"}" base_lr: {base_lr} lr_policy: "fixed" '
                    f"max_iter: 20 random_seed: 3 {extra}")
    return get_solver(str(path))


def test_huge_learning_rate_stops_with_the_layer_named(tmp_path):
    s = solver(tmp_path, mlp(), f'snapshot: 1 snapshot_prefix: "{tmp_path}/run"', base_lr=1e30)
    with pytest.raises(DivergenceError) as info:
        s.solve()
    message = str(info.value)
    assert "\n" not in message
    match = re.match(r"training diverged at iteration (\d+) .*layer '(\w+)'", message)
    assert match, message
    iteration, layer = int(match.group(1)), match.group(2)
    assert layer in ("ip1", "ip2", "relu", "loss")
    assert s.iter == iteration
    # the snapshots are those of the good iterations only, and every one is finite
    written = sorted(int(p.name.split("_iter_")[1].split(".")[0])
                     for p in tmp_path.glob("run_iter_*.caffemodel"))
    assert written == list(range(1, iteration + 1))
    from engine.io import read_net_binary

    for n in written:
        model = read_net_binary(str(tmp_path / f"run_iter_{n}.caffemodel"))
        for lp in model.layer:
            for blob in lp.blobs:
                assert np.isfinite(np.asarray(blob.data)).all()


def test_a_layer_that_makes_nan_in_forward_is_named(tmp_path):
    # log of the (partly negative) hidden values is NaN: the Log layer, not ip1 or ip2
    s = solver(tmp_path, mlp("log", "Log"))
    with np.errstate(invalid="ignore"), pytest.raises(DivergenceError) as info:
        s.step(1)
    assert ("at iteration 0 (loss = nan): the forward of layer 'log' (Log) made top blob 'h2' "
            "non-finite (from finite bottoms)") in str(info.value)
    assert s.iter == 0  # no update was applied


def test_a_layer_that_makes_inf_only_in_backward_is_named(tmp_path):
    # sqrt is finite at 0 but its gradient is not: ip1's zero output makes it so in backward
    net = mlp("sqrt", "Power", "power_param { power: 0.5 }").replace(
        'weight_filler { type: "gaussian" std: 0.5 } } }\nlayer { name: "sqrt"',
        'weight_filler { type: "constant" value: 0 } } }\nlayer { name: "sqrt"')
    s = solver(tmp_path, net)
    with np.errstate(divide="ignore", invalid="ignore"), pytest.raises(DivergenceError) as info:
        s.step(1)
    assert ("the backward of layer 'sqrt' (Power) made the gradient of bottom blob 'h' "
            "non-finite") in str(info.value)


def test_diagnose_reports_finite_nets_as_such(tmp_path):
    s = solver(tmp_path, mlp())
    s.net.forward_backward()
    assert diagnose(s.net).startswith("no layer's output or gradient was non-finite")


def test_cli_prints_one_line_and_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(mlp())
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 1e30 lr_policy: "fixed" max_iter: 20 snapshot: 50 '
        'snapshot_prefix: "snap/mlp" random_seed: 3')
    assert main(["train", "solver.prototxt"]) == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("engine: error:")]
    assert len(errors) == 1 and "training diverged at iteration" in errors[0]
    assert "layer '" in errors[0]
    assert not (tmp_path / "snap").exists()  # snapshot_after_train did not run


# -- debug_info ------------------------------------------------------------------------------
LS = """
name: "ls"
layer { name: "data" type: "Input" top: "x" top: "y"
  input_param { shape { dim: 6 dim: 3 } shape { dim: 6 dim: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "out"
  param { name: "w" } param { }
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


def g(value: float) -> str:
    return f"{value:g}"


def test_debug_info_lines_have_caffes_shape_and_values(tmp_path, caplog):
    s = solver(tmp_path, LS, "debug_info: true display: 2 momentum: 0.9")
    s.net.blobs["x"].data[...] = LS_X
    s.net.blobs["y"].data[...] = LS_Y
    w0, b0 = (p.data.copy() for p in s.net.params["ip"])
    with caplog.at_level(logging.INFO):
        s.step(1)  # iteration 0 displays
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("    [")]
    net = s.net
    w_diff, b_diff = w0 - net.params["ip"][0].data, b0 - net.params["ip"][1].data  # the steps
    out0, loss0 = net.blobs["out"], net.blobs["loss"]
    grads = [w_diff / 0.1, b_diff / 0.1]  # momentum has no history yet: step = lr * gradient
    expected = [
        f"    [Forward] Layer data, top blob x data: {g(mean_abs(LS_X))}",
        f"    [Forward] Layer data, top blob y data: {g(mean_abs(LS_Y))}",
        f"    [Forward] Layer ip, top blob out data: {g(mean_abs(out0.data))}",
        f"    [Forward] Layer ip, param blob w data: {g(mean_abs(w0))}",
        f"    [Forward] Layer ip, param blob 1 data: {g(mean_abs(b0))}",
        f"    [Forward] Layer loss, top blob loss data: {g(mean_abs(loss0.data))}",
        f"    [Backward] Layer loss, bottom blob out diff: {g(mean_abs(out0.diff))}",
        f"    [Backward] Layer ip, param blob 0 diff: {g(mean_abs(grads[0]))}",
        f"    [Backward] Layer ip, param blob 1 diff: {g(mean_abs(grads[1]))}",
        "    [Backward] All net params (data, diff): L1 norm = "
        f"({g(np.abs(w0).sum() + np.abs(b0).sum())}, "
        f"{g(np.abs(grads[0]).sum() + np.abs(grads[1]).sum())}); L2 norm = "
        f"({g(np.sqrt(np.square(w0).sum() + np.square(b0).sum()))}, "
        f"{g(np.sqrt(np.square(grads[0]).sum() + np.square(grads[1]).sum()))})",
        f"    [Update] Layer ip, param w data: {g(mean_abs(w0))}; diff: {g(mean_abs(w_diff))}",
        f"    [Update] Layer ip, param 1 data: {g(mean_abs(b0))}; diff: {g(mean_abs(b_diff))}",
    ]
    assert lines == expected
    summary = next(r for r in caplog.records if "All net params" in r.getMessage())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        s.step(1)  # iteration 1 does not display
    assert not any(r.getMessage().startswith("    [") for r in caplog.records)
    assert summary.levelno == logging.ERROR  # Caffe logs it with LOG(ERROR)


def test_net_debug_info_is_off_on_iterations_that_do_not_display(tmp_path, caplog):
    s = solver(tmp_path, LS.replace('name: "ls"', 'name: "ls" debug_info: true'), "display: 0")
    with caplog.at_level(logging.INFO):
        s.step(2)
    assert not any("[Forward]" in r.getMessage() for r in caplog.records)
