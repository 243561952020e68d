"""Crash safety: SIGKILL at random moments, full disks, damaged snapshots, ``--snapshot latest``,
and files that are safe to open (no pickle, LMDBs the user already opened).

The kill campaign runs 10 kills here; ``MOKA_LONG_TESTS=1`` makes it 100 (or run
``python tests/crash_campaign.py --kills 100``, which prints the counts).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import crash_harness
import h5py
import lmdb
import numpy as np
import pytest

import engine
from engine import caffe_pb2
from engine.cli import main
from engine.data import array_to_datum, write_lmdb
from engine.errors import SolverError
from solvers import snapshot as snapshots

REPO = Path(__file__).resolve().parent.parent
LONG = os.environ.get("MOKA_LONG_TESTS") == "1"


# -- SIGKILL -------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX signals")
def test_sigkill_at_random_moments_then_resume_from_latest(tmp_path):
    crash_harness.write_run(tmp_path, max_iter=1_000_000)
    campaign = crash_harness.kill_campaign(tmp_path, kills=100 if LONG else 10, seed=7)
    assert campaign.problems == [], campaign.summary()
    assert campaign.kills == (100 if LONG else 10)
    assert campaign.resumed_from[-1] > 0  # later runs did resume from a snapshot
    max_iter, problems = crash_harness.finish_and_compare(tmp_path)
    assert problems == []
    assert (tmp_path / "snap" / f"crash_iter_{max_iter}.solverstate").is_file()
    assert "Restored solver state from snap/crash_iter_" in (tmp_path / "train.log").read_text()


def test_the_final_comparison_notices_a_different_run(tmp_path, monkeypatch):
    """finish_and_compare is not vacuous: weights trained otherwise do not pass it."""
    crash_harness.write_run(tmp_path, max_iter=6)
    path = tmp_path / "solver.prototxt"
    path.write_text(path.read_text().replace("base_lr: 0.01", "base_lr: 0.02"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "solver.prototxt"]) == 0
    _, problems = crash_harness.finish_and_compare(tmp_path, extra_iters=0)
    assert problems and "differs from an uninterrupted run" in problems[0]


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def run(tmp_path, monkeypatch):
    """``run(hdf5=False)``: a solver on the tiny net in tmp_path (the working directory)."""
    monkeypatch.chdir(tmp_path)

    def make(hdf5: bool = False, max_iter: int = 30):
        crash_harness.write_run(tmp_path, max_iter=max_iter, hdf5=hdf5)
        return engine.get_solver("solver.prototxt")

    return make


def snap_files(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "snap"))


def pair(iteration: int, hdf5: bool = False) -> list[str]:
    h5 = ".h5" if hdf5 else ""
    return [f"crash_iter_{iteration}.caffemodel{h5}", f"crash_iter_{iteration}.solverstate{h5}"]


def enospc_midway(real_write, calls_before: int = 0):
    """A stand-in for a snapshot write: the first ``calls_before`` calls work; the next writes
    half of what it would and then fails as a full disk does."""
    calls = []

    def write(*args):
        calls.append(args)
        if len(calls) <= calls_before:
            return real_write(*args)
        path = next(a for a in args if isinstance(a, str))
        assert re.fullmatch(r"\..*\.tmp", os.path.basename(path))  # never a snapshot's name
        real_write(*args)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


# -- full disks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("hdf5", [False, True], ids=["binary", "hdf5"])
@pytest.mark.parametrize("failing", ["model", "state"])
def test_enospc_during_a_snapshot_keeps_the_previous_pair(run, tmp_path, monkeypatch, hdf5,
                                                          failing):
    solver = run(hdf5=hdf5)
    solver.step(3)  # snapshot: 3 -> the pair at iteration 3
    assert snap_files(tmp_path) == pair(3, hdf5)
    good = {name: (tmp_path / "snap" / name).read_bytes() for name in pair(3, hdf5)}
    with monkeypatch.context() as patch:
        if hdf5:
            name = "_write_net_hdf5" if failing == "model" else "_write_state_hdf5"
            patch.setattr(snapshots, name, enospc_midway(getattr(snapshots, name)))
        else:
            patch.setattr(snapshots, "_write_file", enospc_midway(
                snapshots._write_file, calls_before=0 if failing == "model" else 1))
        kind = "caffemodel" if failing == "model" else "solverstate"
        with pytest.raises(SolverError, match=re.escape(
                f"cannot write snap/crash_iter_6.{kind}{'.h5' if hdf5 else ''}: No space left on "
                "device (free some disk space, then resume with --snapshot latest)")):
            solver.step(3)
    # the previous pair, byte for byte, and nothing else: no partial file, no orphaned model
    assert snap_files(tmp_path) == pair(3, hdf5)
    assert {n: (tmp_path / "snap" / n).read_bytes() for n in pair(3, hdf5)} == good
    resumed = engine.get_solver("solver.prototxt")
    resumed.restore("latest")
    assert resumed.iter == 3


def test_enospc_stops_engine_train_with_a_clear_error(run, tmp_path, monkeypatch, capsys):
    run(max_iter=9)
    with monkeypatch.context() as patch:
        patch.setattr(snapshots, "_write_file", enospc_midway(snapshots._write_file, 2))
        assert main(["train", "solver.prototxt"]) != 0
    err = capsys.readouterr().err
    assert "cannot write snap/crash_iter_6.caffemodel: No space left on device" in err
    assert "Traceback" not in err
    assert snap_files(tmp_path) == pair(3)
    assert main(["train", "solver.prototxt", "--snapshot", "latest"]) == 0
    assert "Restored solver state from snap/crash_iter_3.solverstate" in capsys.readouterr().err
    assert snap_files(tmp_path) == sorted(pair(3) + pair(6) + pair(9))


# -- damaged snapshots -----------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def flip_a_byte(path: Path) -> None:
    """Corrupt one byte of content: the middle of the file, or of an HDF5 state's history."""
    data = bytearray(path.read_bytes())
    where = len(data) // 2
    if path.name.endswith(".solverstate.h5"):  # the middle may be unused space there
        with h5py.File(path, "r") as f:
            dataset = f["history/0"]
            where = dataset.id.get_offset() + dataset.id.get_storage_size() // 2
    data[where] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("hdf5", [False, True], ids=["binary", "hdf5"])
@pytest.mark.parametrize("damage", [truncate, flip_a_byte], ids=["truncated", "flipped"])
@pytest.mark.parametrize("which", ["caffemodel", "solverstate"])
def test_a_damaged_snapshot_is_refused_naming_the_file(run, tmp_path, hdf5, damage, which):
    solver = run(hdf5=hdf5)
    solver.step(3)
    h5 = ".h5" if hdf5 else ""
    damaged = tmp_path / "snap" / f"crash_iter_3.{which}{h5}"
    damage(damaged)
    fresh = engine.get_solver("solver.prototxt")
    before = fresh.net.params["ip1"][0].data.copy()
    with pytest.raises(SolverError, match=re.escape(str(damaged.relative_to(tmp_path)))) as info:
        fresh.restore(f"snap/crash_iter_3.solverstate{h5}")
    assert re.search(r"truncated|corrupt|replaced", str(info.value))
    assert fresh.iter == 0
    np.testing.assert_array_equal(fresh.net.params["ip1"][0].data, before)  # untouched


@pytest.mark.parametrize("hdf5", [False, True], ids=["binary", "hdf5"])
def test_latest_skips_a_damaged_pair_with_a_warning(run, tmp_path, caplog, hdf5):
    solver = run(hdf5=hdf5)
    solver.step(9)  # pairs at 3, 6, 9
    h5 = ".h5" if hdf5 else ""
    truncate(tmp_path / "snap" / f"crash_iter_9.caffemodel{h5}")
    truncate(tmp_path / "snap" / f"crash_iter_6.solverstate{h5}", keep=0.3)
    resumed = engine.get_solver("solver.prototxt")
    with caplog.at_level(logging.WARNING):
        resumed.restore("latest")
    assert resumed.iter == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"Skipping damaged snapshot snap/crash_iter_9.solverstate{h5}" in w and
               f"crash_iter_9.caffemodel{h5}" in w for w in warnings)
    assert any(f"Skipping damaged snapshot snap/crash_iter_6.solverstate{h5}" in w
               for w in warnings)
    straight = engine.get_solver("solver.prototxt")
    straight.step(3)
    for name in ("ip1", "ip2"):
        np.testing.assert_array_equal(resumed.net.params[name][0].data,
                                      straight.net.params[name][0].data)


def test_latest_prefers_the_newest_and_removes_leftover_temporary_files(run, tmp_path):
    solver = run()
    solver.step(6)
    leftover = tmp_path / "snap" / ".crash_iter_9.caffemodel.0123abcd.tmp"
    leftover.write_bytes(b"half a model")
    unrelated = tmp_path / "snap" / ".notes.tmp"
    unrelated.write_text("mine")
    resumed = engine.get_solver("solver.prototxt")
    resumed.restore("latest")
    assert resumed.iter == 6
    assert not leftover.exists() and unrelated.exists()


def test_latest_with_nothing_to_resume(run, tmp_path, caplog):
    solver = run(max_iter=3)
    with pytest.raises(SolverError, match=r"no snapshot to resume from: nothing matches "
                       r"'snap/crash_iter_N\.solverstate\[\.h5\]'"):
        solver.restore("latest")
    with caplog.at_level(logging.WARNING):
        solver.solve("latest")  # a first start: trains from iteration 0
    assert solver.iter == 3
    assert "No snapshot under 'snap/crash' yet: starting from iteration 0" in caplog.text
    for name in os.listdir(tmp_path / "snap"):
        truncate(tmp_path / "snap" / name, keep=0.2)
    with pytest.raises(SolverError, match=r"every snapshot under 'snap/crash' is damaged"):
        engine.get_solver("solver.prototxt").restore("latest")


def test_engine_train_snapshot_latest(run, tmp_path, capsys):
    run(max_iter=6)
    assert main(["train", "solver.prototxt", "--snapshot", "latest"]) == 0  # nothing yet
    (tmp_path / "solver.prototxt").write_text(
        (tmp_path / "solver.prototxt").read_text().replace("max_iter: 6", "max_iter: 9"))
    capsys.readouterr()
    assert main(["train", "solver.prototxt", "--snapshot", "latest"]) == 0
    assert "Restored solver state from snap/crash_iter_6.solverstate" in capsys.readouterr().err


def test_pycaffe_solver_classes_restore_latest(run, tmp_path):
    run().step(6)
    resumed = engine.AdamSolver("solver.prototxt")
    resumed.restore("latest")
    assert resumed.iter == 6


def test_a_caffe_solverstate_with_a_truncated_model(run, tmp_path):
    """A state without Moka's checksum (as Caffe writes it): the model is parsed in full."""
    run().step(3)
    state = caffe_pb2.SolverState()
    state_path = tmp_path / "snap" / "crash_iter_3.solverstate"
    state.ParseFromString(state_path.read_bytes())
    state.ClearField("moka_resume")
    state.ClearField("moka_sha256")
    state_path.write_bytes(state.SerializeToString())
    engine.get_solver("solver.prototxt").restore(str(state_path))  # complete: fine
    truncate(tmp_path / "snap" / "crash_iter_3.caffemodel")
    with pytest.raises(SolverError, match=r"the model 'snap/crash_iter_3\.caffemodel' named by "
                       r"'.*crash_iter_3\.solverstate' is unreadable: .*truncated"):
        engine.get_solver("solver.prototxt").restore(str(state_path))


def test_snapshot_files_are_written_model_first_under_hidden_temporary_names(
        run, tmp_path, monkeypatch):
    solver = run()
    order = []
    real_replace = os.replace

    def replace(src, dst):
        order.append((os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    solver.step(3)
    assert [dst for _, dst in order] == pair(3)
    for src, dst in order:
        assert re.fullmatch(re.escape(f".{dst}.") + r"[0-9a-f]+\.tmp", src)


def test_get_solver_then_snapshot_into_a_missing_folder(tmp_path, monkeypatch):
    """The issue's report: solver.snapshot() from Python when the folder does not exist."""
    monkeypatch.chdir(tmp_path)
    crash_harness.write_run(tmp_path, max_iter=30, every=0)
    solver = engine.get_solver("solver.prototxt")
    solver.step(2)
    model, state = solver.snapshot()
    assert (model, state) == tuple(f"snap/{n}" for n in pair(2))
    assert snap_files(tmp_path) == pair(2)


# -- safe to open --------------------------------------------------------------------------------
LMDB_NET = """
layer { name: "data" type: "Data" top: "data" top: "label"
  data_param { source: "%s" batch_size: 2 backend: LMDB } }
"""


def tiny_lmdb(path: Path) -> list[bytes]:
    values = [array_to_datum(np.full((1, 2, 2), i, np.uint8), label=i).SerializeToString()
              for i in range(5)]
    write_lmdb(str(path), [(b"%08d" % i, v) for i, v in enumerate(values)])
    return values


@pytest.mark.parametrize("user_first", [True, False], ids=["user-first", "net-first"])
def test_an_lmdb_the_user_opened_in_this_process_works(tmp_path, user_first):
    values = tiny_lmdb(tmp_path / "db")
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(LMDB_NET % (tmp_path / "db"))
    if user_first:
        env = lmdb.open(str(tmp_path / "db"))  # as the script does: read-write, locked
        net = engine.Net(str(net_file), engine.TEST)
    else:
        net = engine.Net(str(net_file), engine.TEST)
        env = lmdb.open(str(tmp_path / "db"))
    try:
        net.forward()
        assert net.blobs["label"].data.tolist() == [0, 1]
        with env.begin() as txn:  # the user's environment still works alongside
            assert txn.get(b"00000002") == values[2]
    finally:
        env.close()
    net.forward()  # and the net's own survives the user's close
    assert net.blobs["label"].data.tolist() == [2, 3]


def test_no_file_moka_reads_can_unpickle():
    """np.load always with allow_pickle=False; no pickle/marshal/yaml loading anywhere."""
    offenders = []
    for folder in ("engine", "solvers"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            for match in re.finditer(r"np\.load\(([^()]|\([^()]*\))*\)", text):
                if "allow_pickle=False" not in match.group(0):
                    offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
            for word in ("import pickle", "import marshal", "import dill", "yaml.load(",
                         "pickle.load", "joblib.load", "import cloudpickle"):
                if word in text:
                    offenders.append(f"{path.relative_to(REPO)}: {word}")
    assert offenders == []


def test_the_pickle_scan_catches_a_bare_np_load():
    text = 'x = np.load(path)\ny = np.load(open(p), allow_pickle=False)\n'
    found = [m.group(0) for m in re.finditer(r"np\.load\(([^()]|\([^()]*\))*\)", text)]
    assert found == ["np.load(path)", "np.load(open(p), allow_pickle=False)"]


def test_engine_classify_refuses_a_pickled_npy(tmp_path):
    from engine.pytools import ToolError, _load_npy

    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ToolError, match=r"objects\.npy'.*cannot read as a \.npy array"):
        _load_npy(str(tmp_path / "objects.npy"), "input_file")
    np.save(tmp_path / "ok.npy", np.arange(3.0))
    assert _load_npy(str(tmp_path / "ok.npy"), "input_file").tolist() == [0.0, 1.0, 2.0]



def test_a_moved_run_prefers_the_matching_model_beside_its_state(run, tmp_path, monkeypatch):
    """learned_net is relative to where training ran; elsewhere a different run's model may sit
    at that path: the checksum picks the one beside the state."""
    run().step(3)
    os.rename(tmp_path / "snap", tmp_path / "moved")
    other = tmp_path / "elsewhere"
    (other / "snap").mkdir(parents=True)
    (other / "snap" / "crash_iter_3.caffemodel").write_bytes(b"another run's model")
    monkeypatch.chdir(other)
    state = str(tmp_path / "moved" / "crash_iter_3.solverstate")
    _, model = snapshots.check_snapshot(state)
    assert model == str(tmp_path / "moved" / "crash_iter_3.caffemodel")
    os.remove(tmp_path / "moved" / "crash_iter_3.caffemodel")
    with pytest.raises(SolverError, match=r"the model 'snap/crash_iter_3\.caffemodel' is 19 "
                       r"bytes, but the solver state .* was written with one of \d+ bytes"):
        snapshots.check_snapshot(state)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX resource limits")
def test_a_write_failing_inside_hdf5_leaves_no_snapshot_behind(tmp_path):
    """HDF5 writes much of a file while closing it, where h5py only prints a failure: a real
    write error (a file-size limit here, as a full disk would) must still stop the snapshot."""
    crash_harness.write_run(tmp_path, max_iter=6, hdf5=True)
    (tmp_path / "net.prototxt").write_text(
        crash_harness.NET.replace("num_output: 8", "num_output: 500"))
    # the model (~20 kB) fits under the limit, the state (~30 kB) does not
    limited = ("import resource, runpy, signal, sys; "
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (25000, 25000)); "
               "sys.argv = ['engine', 'train', 'solver.prototxt']; "
               "runpy.run_module('engine', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", limited], cwd=tmp_path,
                          env=crash_harness.engine_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert ("engine: error: cannot write snap/crash_iter_3.solverstate.h5: File too large"
            in done.stderr)
    assert "Traceback" not in done.stderr
    assert os.listdir(tmp_path / "snap") == []  # no partial state, no orphaned model
