"""Caffe's command line: gflags' single-dash spellings, -gpu, --version, device_query."""

from __future__ import annotations

import numpy as np
import pytest
from test_cli import GLOG, assert_one_line_error, weights, write_solver

from engine.cli import build_parser, caffe_flags, main


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_solver(tmp_path)
    return tmp_path


def test_caffe_flags_rewrites_only_known_long_options():
    parser = build_parser()
    argv = ["train", "-solver", "s.prototxt", "-weights=a,b", "-v", "-gpu", "all", "--level",
            "-1", "-sigint_effect=none", "-frobnicate", "--", "-solver"]
    assert caffe_flags(argv, parser) == [
        "train", "--solver", "s.prototxt", "--weights=a,b", "-v", "--gpu", "all", "--level",
        "-1", "--sigint_effect=none", "-frobnicate", "--", "-solver"]


@pytest.mark.parametrize("spelling", [
    ["-solver", "solver.prototxt"],
    ["-solver=solver.prototxt"],
    ["--solver", "solver.prototxt"],
])
def test_single_and_double_dash_give_identical_runs(workdir, capsys, spelling):
    assert main(["train", "--solver=solver.prototxt"]) == 0
    reference = weights(workdir / "snap/tiny_iter_4.caffemodel")
    for path in (workdir / "snap").iterdir():
        path.unlink()
    assert main(["train", *spelling, "-sighup_effect", "none", "-level=0"]) == 0
    again = weights(workdir / "snap/tiny_iter_4.caffemodel")
    assert reference.keys() == again.keys()
    for name, blobs in reference.items():
        for a, b in zip(blobs, again[name], strict=True):
            np.testing.assert_array_equal(a, b)


def test_single_dash_snapshot_and_weights(workdir, capsys):
    assert main(["train", "-solver", "solver.prototxt"]) == 0
    straight = weights(workdir / "snap/tiny_iter_4.caffemodel")
    (workdir / "snap/tiny_iter_4.caffemodel").unlink()
    assert main(["train", "-solver", "solver.prototxt",
                 "-snapshot", "snap/tiny_iter_2.solverstate"]) == 0
    resumed = weights(workdir / "snap/tiny_iter_4.caffemodel")
    np.testing.assert_array_equal(straight["ip"][0], resumed["ip"][0])
    capsys.readouterr()
    assert main(["test", "-model", "net.prototxt", "-weights", "snap/tiny_iter_4.caffemodel",
                 "-iterations", "2"]) == 0
    assert "Batch 1, acc = " in capsys.readouterr().err


def test_gpu_flag_warns_once_and_trains_on_the_cpu(workdir, capsys):
    assert main(["train", "-solver", "solver.prototxt", "-gpu", "0"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "CPU only" in line]
    assert len(warnings) == 1 and warnings[0].startswith("W"), err
    assert "training continues on the CPU" in warnings[0]
    assert (workdir / "snap/tiny_iter_4.caffemodel").is_file()


def test_time_takes_single_dash_model_phase_and_iterations(workdir, capsys):
    assert main(["time", "-model", "net.prototxt", "-phase", "TEST", "-iterations", "1",
                 "-gpu", "all"]) == 0
    err = capsys.readouterr().err
    assert "Average Forward pass" in err and "CPU only" in err


def test_unknown_single_dash_flag_is_one_line(workdir, capsys):
    rc = main(["train", "-solver", "solver.prototxt", "-frobnicate", "1"])
    assert_one_line_error(rc, capsys.readouterr().err, "-frobnicate")


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("engine version ") and "numpy" in out
    assert main(["-version"]) == 0


def test_device_query_names_cpu_blas_and_threads(capsys):
    assert main(["device_query"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert all(GLOG.match(line) for line in lines)
    text = "\n".join(lines)
    for fragment in ("CPU model: ", "Logical cores: ", "BLAS: ", "threads: ",
                     f"numpy version: {np.__version__}", "Moka threads: "):
        assert fragment in text


def test_no_command_is_one_line(capsys):
    rc = main([])
    assert_one_line_error(rc, capsys.readouterr().err, "need a command")


def test_device_query_without_threadpoolctl_reads_numpys_configuration(monkeypatch):
    import builtins

    from engine import device

    real_import = builtins.__import__

    def no_threadpoolctl(name, *args, **kwargs):
        if name == "threadpoolctl":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_threadpoolctl)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    (blas,) = device.blas_info()
    assert blas["source"] == "numpy build configuration"
    assert blas["threads"] == "3 (from OPENBLAS_NUM_THREADS)"
    assert blas["name"]


@pytest.mark.parametrize("command", ["train", "test", "time"])
def test_moka_switches_take_either_spelling(command):
    parser = build_parser()
    for hyphen, underscore, dest in (("--allow-python", "--allow_python", "allow_python"),
                                     ("--no-progress", "--no_progress", "no_progress")):
        if command == "time" and dest == "no_progress":
            continue
        assert getattr(parser.parse_args([command, hyphen]), dest) is True
        assert getattr(parser.parse_args([command, underscore]), dest) is True
