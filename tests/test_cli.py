"""The ``engine`` command, run in process through ``main([...])``."""

from __future__ import annotations

import os
import re
import runpy
import signal
import sys

import numpy as np
import pytest

from engine.cli import main
from engine.io import read_net_binary

NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "t"
  dummy_data_param { shape { dim: 6 dim: 4 } shape { dim: 6 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "extra" type: "InnerProduct" bottom: "x" top: "z" include { min_level: 1 }
  inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "y" bottom: "t" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "y" bottom: "t" top: "acc"
  include { phase: TEST } }
"""

SOLVER = """
net: "net.prototxt"
test_iter: 2
test_interval: 2
base_lr: {lr}
momentum: 0.9
lr_policy: "fixed"
display: 1
max_iter: {max_iter}
snapshot: 2
snapshot_prefix: "snap/tiny"
random_seed: 7
"""

# tools/extra/parse_log.py's patterns
ITERATION = re.compile(r"Iteration (\d+)")
LOSS = re.compile(r"loss = ([.\deE+-]+)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([.\deE+-]+)")
LR = re.compile(r"lr = ([.\deE+-]+)")
GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ [\w.]+:\d+\] ")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding the tiny net and a 4-iteration solver."""
    monkeypatch.chdir(tmp_path)
    write_solver(tmp_path)
    return tmp_path


def write_solver(folder, max_iter: int = 4, lr: float = 0.1, name: str = "solver.prototxt"):
    (folder / "net.prototxt").write_text(NET)
    (folder / name).write_text(SOLVER.replace("{lr}", str(lr))
                               .replace("{max_iter}", str(max_iter)))
    return name


def weights(path) -> dict[str, list[np.ndarray]]:
    net = read_net_binary(str(path))
    return {layer.name: [np.array(b.data) for b in layer.blobs] for layer in net.layer
            if layer.blobs}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("engine: error:")]


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc != 0
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0]


# -- train -----------------------------------------------------------------------------------
def test_train_writes_snapshots_and_caffe_log_lines(workdir, capsys):
    assert main(["train", "solver.prototxt"]) == 0
    err = capsys.readouterr().err
    for n in (2, 4):
        assert (workdir / f"snap/tiny_iter_{n}.caffemodel").is_file()
        assert (workdir / f"snap/tiny_iter_{n}.solverstate").is_file()
    lines = err.splitlines()
    assert all(GLOG.match(line) for line in lines), [ln for ln in lines if not GLOG.match(ln)]
    iterations = {int(m.group(1)) for line in lines if (m := ITERATION.search(line))}
    assert {0, 1, 2, 3, 4} <= iterations
    assert any(LOSS.search(line) and "Iteration 3" in line for line in lines)
    assert any(LR.search(line) for line in lines)
    outputs = {m.group(2) for line in lines if (m := TEST_OUTPUT.search(line))}
    assert outputs == {"acc", "loss"}
    assert "Optimization Done." in err


def test_train_solver_flag_equals_positional(workdir, capsys):
    assert main(["train", "--solver=solver.prototxt"]) == 0
    assert (workdir / "snap/tiny_iter_4.caffemodel").is_file()


def test_snapshot_resumes_to_the_same_weights(workdir, capsys):
    assert main(["train", "solver.prototxt"]) == 0
    straight = weights(workdir / "snap/tiny_iter_4.caffemodel")
    (workdir / "snap/tiny_iter_4.caffemodel").unlink()
    capsys.readouterr()
    assert main(["train", "solver.prototxt", "--snapshot", "snap/tiny_iter_2.solverstate"]) == 0
    err = capsys.readouterr().err
    assert "Resuming from snap/tiny_iter_2.solverstate" in err
    assert "Iteration 1," not in err  # resumed at 2
    resumed = weights(workdir / "snap/tiny_iter_4.caffemodel")
    for name, blobs in straight.items():
        for a, b in zip(blobs, resumed[name], strict=True):
            np.testing.assert_array_equal(a, b)


def test_weights_fine_tune_copies_layers(workdir, capsys):
    assert main(["train", "solver.prototxt"]) == 0
    trained = weights(workdir / "snap/tiny_iter_4.caffemodel")
    write_solver(workdir, max_iter=1, lr=0.0, name="frozen.prototxt")
    (workdir / "frozen.prototxt").write_text(
        (workdir / "frozen.prototxt").read_text().replace("snap/tiny", "ft/tiny"))
    assert main(["train", "frozen.prototxt", "--weights", "snap/tiny_iter_4.caffemodel"]) == 0
    copied = weights(workdir / "ft/tiny_iter_1.caffemodel")
    np.testing.assert_array_equal(copied["ip"][0], trained["ip"][0])


def test_level_and_stage_go_into_the_train_state(workdir, capsys):
    assert main(["train", "solver.prototxt", "--level", "1", "--stage", "a,b"]) == 0
    assert "extra" in weights(workdir / "snap/tiny_iter_4.caffemodel")
    assert main(["train", "solver.prototxt"]) == 0
    assert "extra" not in weights(workdir / "snap/tiny_iter_4.caffemodel")


def test_sigint_stops_training_with_a_snapshot(workdir, capsys, monkeypatch):
    from engine.net import Net

    write_solver(workdir, max_iter=1000)
    real = Net.forward_backward
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Net, "forward_backward", interrupted)
    assert main(["train", "solver.prototxt"]) == 0
    assert len(calls) < 10
    snapshots = sorted(workdir.glob("snap/*.caffemodel"))
    assert snapshots and not (workdir / "snap/tiny_iter_1000.caffemodel").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- user errors: one line, non-zero, no traceback ---------------------------------------------
@pytest.mark.parametrize(("argv", "fragments"), [
    (["train", "missing.prototxt"], ["missing.prototxt", "not found"]),
    (["train"], ["need a solver"]),
    (["train", "solver.prototxt", "--snapshot", "a.solverstate", "--weights", "b.caffemodel"],
     ["--weights", "--snapshot"]),
    (["train", "solver.prototxt", "--weights", "nope.caffemodel"], ["nope.caffemodel"]),
    (["train", "solver.prototxt", "--snapshot", "nope.solverstate"], ["nope.solverstate"]),
    (["train", "solver.prototxt", "--iterations", "3"], ["--iterations"]),
    (["train", "solver.prototxt", "--sigint_effect", "explode"], ["sigint_effect"]),
    (["test", "--model", "net.prototxt"], ["weights"]),
    (["test", "--weights", "w.caffemodel"], ["model"]),
    (["time", "--model", "nope.prototxt"], ["nope.prototxt"]),
    (["time", "--model", "net.prototxt", "--iterations", "0"], ["--iterations"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_usage_errors_are_one_line(workdir, capsys, argv, fragments):
    rc = main(argv)
    assert_one_line_error(rc, capsys.readouterr().err, *fragments)


def test_unknown_layer_type_is_one_line(workdir, capsys):
    (workdir / "net.prototxt").write_text(NET.replace('"InnerProduct"', '"InnerProdcut"', 1))
    rc = main(["train", "solver.prototxt"])
    assert_one_line_error(rc, capsys.readouterr().err, "InnerProdcut", "InnerProduct")


def test_malformed_prototxt_is_one_line_with_position(workdir, capsys):
    (workdir / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nmax_itr: 3\n')
    rc = main(["train", "solver.prototxt"])
    assert_one_line_error(rc, capsys.readouterr().err, "solver.prototxt:3")


def test_verbose_shows_the_traceback(workdir, capsys):
    (workdir / "net.prototxt").write_text("layer { name: ")
    rc = main(["time", "--model", "net.prototxt", "--verbose"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" in err
    assert len(error_lines(err)) == 1


def test_quiet_hides_info_lines(workdir, capsys):
    assert main(["train", "solver.prototxt", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Iteration" not in err


# -- test and time ---------------------------------------------------------------------------
def test_test_prints_batches_and_means(workdir, capsys):
    assert main(["train", "solver.prototxt"]) == 0
    capsys.readouterr()
    rc = main(["test", "--model", "net.prototxt", "--weights", "snap/tiny_iter_4.caffemodel",
               "--iterations", "3"])
    err = capsys.readouterr().err
    assert rc == 0
    for i in range(3):
        assert re.search(rf"\] Batch {i}, acc = [.\d]+$", err, re.M)
        assert re.search(rf"\] Batch {i}, loss = [.\deE+-]+$", err, re.M)
    assert re.search(r"\] Loss: [.\deE+-]+$", err, re.M)
    assert re.search(r"\] acc = [.\d]+$", err, re.M)
    assert re.search(r"\] loss = [.\deE+-]+ \(\* 1 = [.\deE+-]+ loss\)$", err, re.M)


def test_time_prints_the_layer_table(workdir, capsys):
    rc = main(["time", "--model", "net.prototxt", "--iterations", "2"])
    err = capsys.readouterr().err
    assert rc == 0
    for layer in ("data", "ip", "loss"):
        assert re.search(rf"\] +{layer}\tforward: [.\deE+-]+ ms\.$", err, re.M)
        assert re.search(rf"\] +{layer}\tbackward: [.\deE+-]+ ms\.$", err, re.M)
    assert "acc\t" not in err  # the TRAIN phase by default
    for total in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward",
                  "Total Time"):
        assert re.search(rf"\] {total}: [.\deE+-]+ ms\.$", err, re.M)
    assert main(["time", "--model", "net.prototxt", "--iterations", "1", "--phase", "TEST"]) == 0
    assert "acc\tforward" in capsys.readouterr().err


def test_time_with_an_unreadable_data_source_is_one_line(workdir, capsys):
    (workdir / "net.prototxt").write_text("""
layer { name: "d" type: "Data" top: "x" top: "t"
        data_param { source: "no_such_lmdb" batch_size: 2 backend: LMDB } }
""")
    rc = main(["time", "--model", "net.prototxt"])
    assert_one_line_error(rc, capsys.readouterr().err, "no_such_lmdb", "data")


# -- the entry points ------------------------------------------------------------------------
def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "test", "time"):
        assert command in out


def test_python_dash_m_engine(workdir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["engine", "time", "--model", "net.prototxt",
                                      "--iterations", "1"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("engine", run_name="__main__")
    assert exit_info.value.code == 0
    assert "Total Time" in capsys.readouterr().err


def test_logging_is_restored_after_main(workdir, capsys):
    import logging

    handlers = list(logging.getLogger().handlers)
    main(["time", "--model", "net.prototxt", "--iterations", "1"])
    assert logging.getLogger().handlers == handlers
