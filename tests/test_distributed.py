"""MPI data-parallel training (engine/distributed.py): ``mpiexec -n K`` jobs spawned from pytest.

K ranks at batch B must make the updates of one process at ``iter_size: K`` on the same
records. With K = 2 and the single process's data file interleaved so that its k-th pass reads
exactly rank k's batch, every sum is the same two addends in the same order, so the weights and
the loss trace must be bit-identical; with K = 4 MPI adds in another order (float32 rounding).
The in-process tests at the end need no MPI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from layer_helpers import make_layer

from engine import distributed
from engine.io import read_net_binary
from solvers.snapshot import read_state

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mpi_worker.py"
BATCH, RECORDS = 4, 40  # 40 records: the stream wraps inside the runs below


def _mpiexec() -> str | None:
    """MPICH's mpiexec (hydra), preferably the one beside this Python (pip install mpich)."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    found = shutil.which("mpiexec", path=path)
    if found is None:
        return None
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
    return found if "HYDRA" in version.stdout else None


MPIEXEC = _mpiexec() if importlib.util.find_spec("mpi4py") else None
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="needs mpi4py and MPICH's mpiexec "
                               '(pip install "moka[mpi]")')


def _env(**extra: str) -> dict[str, str]:
    # one thread per rank: up to 4 ranks share the test machine's cores
    return dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                MOKA_NUM_THREADS="1", **extra)


def _command(ranks: int, args: list[str]) -> list[str]:
    return [MPIEXEC, "-n", str(ranks), sys.executable, *args]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _write_data(folder: Path, ranks: int) -> None:
    """``plain.h5`` in record order, and ``interleaved.h5``: the same records ordered so that
    one process's k-th batch of iteration t is rank k's batch (records (tB + b)K + k)."""
    rng = np.random.default_rng(3)
    data = rng.standard_normal((RECORDS, 1, 6, 6)).astype(np.float32)
    label = rng.integers(0, 3, RECORDS).astype(np.float32)
    order = np.arange(RECORDS)
    per_iter = BATCH * ranks
    for t in range(RECORDS // per_iter):
        for k in range(ranks):
            for b in range(BATCH):
                order[(t * ranks + k) * BATCH + b] = (t * BATCH + b) * ranks + k
    for name, rows in (("plain", np.arange(RECORDS)), ("interleaved", order)):
        with h5py.File(folder / f"{name}.h5", "w") as f:
            f["data"], f["label"] = data[rows], label[rows]
        (folder / f"{name}.txt").write_text(f"{name}.h5\n")
        (folder / f"{name}.prototxt").write_text(NET.replace("SOURCE", f"{name}.txt"))


NET = """name: "tiny"
layer { name: "d" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param { source: "SOURCE" batch_size: 4 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def _solver(folder: Path, name: str, net: str = "plain.prototxt", **fields) -> str:
    values = {"net": f'"{net}"', "base_lr": 0.1, "momentum": 0.9, "lr_policy": '"fixed"',
              "max_iter": 8, "display": 1, "random_seed": 7, "snapshot_after_train": "false",
              "snapshot_prefix": f'"{name}/s"', **fields}
    (folder / f"{name}.prototxt").write_text(
        "".join(f"{key}: {value}\n" for key, value in values.items()))
    return f"{name}.prototxt"


def _load(path: Path) -> tuple[list[np.ndarray], np.ndarray, dict]:
    saved = np.load(path)
    params = [saved[f"arr_{i}"] for i in range(len(saved.files) - 2)]
    return params, saved["losses"], json.loads(str(saved["data_state"]))


def _caffemodel_params(path: Path) -> list[np.ndarray]:
    """Every parameter blob of a .caffemodel, flattened, in layer order."""
    net = read_net_binary(str(path))
    return [np.array(blob.data, np.float32) for layer in net.layer for blob in layer.blobs]


# -- K ranks == one process at iter_size K ---------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("ranks, layer_wise", [(2, "true"), (2, "false"), (4, "true")])
def test_k_ranks_equal_one_process_at_iter_size_k(tmp_path, ranks, layer_wise):
    _write_data(tmp_path, ranks)
    solver = _solver(tmp_path, "run", layer_wise_reduce=layer_wise)
    iters = 6
    _run(_command(ranks, [str(WORKER), solver, "k", str(iters), "--mpi"]), tmp_path)
    one_net = "interleaved.prototxt" if ranks == 2 else "plain.prototxt"
    _run([sys.executable, str(WORKER), solver, "one", str(iters), "--iter-size", str(ranks),
          "--net", one_net], tmp_path)
    per_rank = [_load(tmp_path / f"k_rank{r}.npz") for r in range(ranks)]
    one_params, one_losses, one_state = _load(tmp_path / "one_rank0.npz")
    for params, losses, state in per_rank[1:]:  # every rank holds the same weights
        for a, b in zip(params, per_rank[0][0], strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(losses, per_rank[0][1])
        assert state == per_rank[0][2]
    params, losses, state = per_rank[0]
    assert state == one_state  # the global read position: iters * K * B records
    assert state["d"]["cursor"] == iters * ranks * BATCH % RECORDS
    if ranks == 2:  # same addends in the same order: bit for bit
        for a, b in zip(params, one_params, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(losses, one_losses)
    else:  # MPI sums (g0 + g1) + (g2 + g3); one process ((g0 + g1) + g2) + g3
        for a, b in zip(params, one_params, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses, one_losses, rtol=1e-5)


# -- engine train under mpiexec: one voice, snapshots, resume --------------------------------
def _glog_pids(log: str) -> set[str]:
    return set(re.findall(r"^[IWE]\d{4} [\d:.]+ (\d+) ", log, flags=re.MULTILINE))


@needs_mpi
def test_engine_train_snapshot_resumes_on_k_ranks_and_on_one_process(tmp_path):
    _write_data(tmp_path, 2)
    first = _solver(tmp_path, "a", snapshot=4)
    run = _run(_command(2, ["-m", "engine", "train", first]), tmp_path)
    assert len(_glog_pids(run.stderr)) == 1  # rank 0 alone logs
    assert run.stderr.count("Optimization Done.") == 1
    assert "Data-parallel training on 2 MPI ranks" in run.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "s_iter_4.caffemodel", "s_iter_4.solverstate",
        "s_iter_8.caffemodel", "s_iter_8.solverstate"]
    uninterrupted = _caffemodel_params(tmp_path / "a/s_iter_8.caffemodel")

    # the same K: bit-exact
    second = _solver(tmp_path, "b", snapshot=4)
    _run(_command(2, ["-m", "engine", "train", second, "--snapshot", "a/s_iter_4.solverstate"]),
         tmp_path)
    for a, b in zip(_caffemodel_params(tmp_path / "b/s_iter_8.caffemodel"), uninterrupted,
                    strict=True):
        np.testing.assert_array_equal(a, b)
    a_state, b_state = (read_state(str(tmp_path / f"{x}/s_iter_8.solverstate")) for x in "ab")
    for a, b in zip(a_state.history, b_state.history, strict=True):
        np.testing.assert_array_equal(a, b)
    assert a_state.resume.layer_state == b_state.resume.layer_state

    # one process at iter_size 2 carries on from the global data position, bit for bit
    third = _solver(tmp_path, "c")
    _run([sys.executable, str(WORKER), third, "one", "4", "--iter-size", "2",
          "--net", "interleaved.prototxt", "--restore", "a/s_iter_4.solverstate"], tmp_path)
    params, _, state = _load(tmp_path / "one_rank0.npz")
    for a, b in zip(params, uninterrupted, strict=True):
        np.testing.assert_array_equal(a.ravel(), b)
    saved = json.loads(a_state.resume.layer_state[0].json_state)
    assert state["d"] == saved
    assert (saved["cursor"], saved["epoch"]) == (8 * 2 * BATCH % RECORDS, 1)

    # four ranks carry on from the same global position: 32 + 4 * 16 records = epoch 2, row 16
    _run(_command(4, [str(WORKER), third, "four", "4", "--mpi",
                      "--restore", "a/s_iter_4.solverstate"]), tmp_path)
    four = [_load(tmp_path / f"four_rank{r}.npz") for r in range(4)]
    for params, _, state in four:
        for a, b in zip(params, four[0][0], strict=True):
            np.testing.assert_array_equal(a, b)
        assert (state["d"]["cursor"], state["d"]["epoch"]) == ((32 + 4 * 16) % RECORDS, 2)


# -- failures and signals -----------------------------------------------------------------
@needs_mpi
def test_a_failing_rank_stops_the_job_with_its_rank_and_message(tmp_path):
    _write_data(tmp_path, 2)
    solver = _solver(tmp_path, "run")
    done = subprocess.run(_command(2, [str(WORKER), solver, "k", "8", "--mpi", "--fail", "1:3"]),
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert ("engine: error: rank 1 of 2: ValueError: injected failure before iteration 3"
            in done.stderr)
    assert not list(tmp_path.glob("k_rank*.npz"))


def _start_long_run(tmp_path: Path, tag: str, sigint_effect: str = "stop"):
    _write_data(tmp_path, 2)
    # no random_seed: rank 0 draws one for all (else the parameter check would stop the job)
    solver = _solver(tmp_path, "run", max_iter=10**6, display=0, snapshot_after_train="true",
                     random_seed=-1)
    log = (tmp_path / "log.txt").open("w")
    job = subprocess.Popen(_command(2, ["-m", "engine", "train", solver, "--sigint_effect",
                                        sigint_effect]),
                           cwd=tmp_path, env=_env(MOKA_TEST_JOB=tag), stdout=log,
                           stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "Starting Optimization" not in (tmp_path / "log.txt").read_text():
        assert job.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "log.txt").read_text()[-2000:]
        time.sleep(0.2)
    time.sleep(1.0)  # a few iterations in
    return job, _rank_pid(tag, 1)


def _rank_pid(tag: str, rank: int) -> int:
    """The process of ``rank`` in the job started with MOKA_TEST_JOB=tag."""
    wanted = {f"MOKA_TEST_JOB={tag}".encode(), f"PMI_RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} found")


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks in /proc")
def test_a_killed_rank_ends_the_job_within_seconds(tmp_path):
    job, pid = _start_long_run(tmp_path, uuid.uuid4().hex)
    try:
        os.kill(pid, signal.SIGKILL)
        job.wait(timeout=60)  # a hang fails here
    finally:
        if job.poll() is None:
            job.kill()
    log = (tmp_path / "log.txt").read_text()
    assert job.returncode != 0
    # MPICH's launcher reports the job's end (naming the first process it saw die)
    assert "BAD TERMINATION" in log and "EXIT CODE: 9" in log, log[-3000:]


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks in /proc")
def test_sigint_to_one_rank_stops_every_rank_after_the_same_iteration(tmp_path):
    job, pid = _start_long_run(tmp_path, uuid.uuid4().hex)
    try:
        os.kill(pid, signal.SIGINT)  # rank 1 alone gets it; rank 0 must stop too
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    log = (tmp_path / "log.txt").read_text()
    assert job.returncode == 0, log[-2000:]
    assert "Optimization stopped early." in log
    assert "No random_seed in the solver: all 2 ranks use" in log
    snapshots = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert len(snapshots) == 2 and snapshots[0].endswith(".caffemodel")


# -- without MPI ----------------------------------------------------------------------------
@pytest.mark.parametrize("environ, expected", [
    ({}, (0, 1)),
    ({"PMI_RANK": "3", "PMI_SIZE": "4"}, (3, 4)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, (1, 2)),
    ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "8"}, (0, 8)),
])
def test_launched_ranks_reads_the_launchers_variables(environ, expected):
    assert distributed.launched_ranks(environ) == expected


def test_one_process_does_not_import_mpi(monkeypatch):
    for name in distributed.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # an import would raise
    assert distributed.connect() is None


def test_a_multi_rank_launch_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(distributed.DistributedError, match=r'rank 1 of 2.*moka\[mpi\]'):
        distributed.connect()


def test_mpi_flag_without_mpi4py_says_what_to_install(monkeypatch):
    for name in distributed.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(distributed.DistributedError, match=r'--mpi asks for MPI.*moka\[mpi\]'):
        distributed.connect(force=True)


def test_hdf5_data_share_keeps_records_i_mod_k_and_the_global_cursor(tmp_path):
    rows = np.arange(10, dtype=np.float64)[:, None]
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"] = rows
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'd.h5'}\n")
    text = f'type: "HDF5Data" top: "x" hdf5_data_param {{ source: "{tmp_path}/list.txt" ' \
           'batch_size: 2 }'
    seen = []
    for rank in range(3):
        layer, top = make_layer(text, [])
        layer.share(rank, 3)
        batches = []
        for _ in range(2):
            layer.forward([], top)
            batches.append(top[0].data.ravel().copy())
        seen.append(np.concatenate(batches))
        assert layer.get_state()["cursor"] == 2 * 2 * 3 % 10  # 12 records read, wrapped
    np.testing.assert_array_equal(seen[0], [0, 3, 6, 9])
    np.testing.assert_array_equal(seen[1], [1, 4, 7, 0])
    np.testing.assert_array_equal(seen[2], [2, 5, 8, 1])


def test_a_data_layer_that_cannot_split_its_records_is_refused():
    from google.protobuf import text_format

    from engine import caffe_pb2
    from engine.net import Net

    net = Net(text_format.Parse('layer { name: "m" type: "MemoryData" top: "d" top: "l" '
                             'memory_data_param { batch_size: 2 channels: 1 height: 1 '
                             'width: 1 } }', caffe_pb2.NetParameter()))
    with pytest.raises(distributed.DistributedError, match="layer 'm' \\(MemoryData\\)"):
        distributed.share_data(net, 1, 2)


def test_image_data_share_loads_only_this_ranks_images(tmp_path):
    from PIL import Image

    lines = []
    for i in range(5):
        Image.fromarray(np.full((2, 2), i * 10, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    text = (f'type: "ImageData" top: "d" top: "l" image_data_param {{ source: '
            f'"{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: 2 is_color: false }}')
    layer, top = make_layer(text, [], n_top=2)
    layer.share(1, 2)
    labels = []
    for _ in range(3):
        layer.forward([], top)
        labels.extend(top[1].data.tolist())
        np.testing.assert_array_equal(top[0].data[:, 0, 0, 0], top[1].data * 10)
    assert labels == [1, 3, 0, 2, 4, 1]  # records 1, 3, 5 = 0 (wrapped), 7 = 2, ...
    assert layer.get_state()["cursor"] == 3 * 2 * 2 % 5


# -- the reduction's order, with a stand-in for MPI -----------------------------------------
class _FakeMPI:
    """Two ranks holding the same gradients: each allreduce doubles its buffer."""

    IN_PLACE, SUM, MAX = object(), "sum", "max"

    class Request:
        @staticmethod
        def Testall(requests) -> bool:
            return True

    def __init__(self, events: list) -> None:
        self.COMM_WORLD = self
        self.events = events

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 2

    def allgather(self, value):
        return [value, value]

    def Iallreduce(self, where, buffer, op):
        assert where is self.IN_PLACE
        self.events.append(("reduce", buffer.size))
        if op == self.SUM:
            buffer *= 2
        return object()


FAKE_NET = """name: "fake"
layer { name: "d" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 4 dim: 1 dim: 6 dim: 6 } shape { dim: 4 }
                           data_filler { type: "gaussian" } data_filler { type: "constant" } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def _fake_solver(layer_wise: bool, events: list | None):
    from engine import caffe_pb2
    from engine.io import parse_text
    from solvers import get_solver

    param = caffe_pb2.SolverParameter(base_lr=0.1, momentum=0.9, lr_policy="fixed",
                                      max_iter=10, random_seed=3, layer_wise_reduce=layer_wise)
    param.net_param.CopyFrom(parse_text(FAKE_NET, caffe_pb2.NetParameter))
    solver = get_solver(param)
    if events is not None:
        distributed.DataParallel(_FakeMPI(events)).attach(solver)
        solver.net.before_backward(lambda i: events.append(("backward", i)))
    return solver


@pytest.mark.parametrize("layer_wise", [True, False])
def test_layer_wise_reduce_starts_each_layers_reduction_after_its_backward(layer_wise):
    events: list = []
    solver = _fake_solver(layer_wise, events)
    alone = _fake_solver(layer_wise, None)
    events.clear()  # the parameter check
    solver.step(1)
    alone.step(1)
    sizes = [blob.count for blob in solver.net.learnable_params]  # conv W, b; ip W, b
    # layers: 0 data, 1 conv, 2 ip, 3 loss; ("backward", i) is logged as layer i's starts
    if layer_wise:  # ip's gradients leave before conv's backward starts
        assert events[:8] == [("backward", 3), ("backward", 2), ("reduce", sizes[2]),
                              ("reduce", sizes[3]), ("backward", 1), ("reduce", sizes[0]),
                              ("reduce", sizes[1]), ("backward", 0)]
    else:  # one fused reduction after the whole backward
        assert events[:5] == [("backward", 3), ("backward", 2), ("backward", 1),
                              ("backward", 0), ("reduce", sum(sizes))]
    # then the loss with rank 0's lr step, and the signal flags (no handlers here: none)
    assert events[-2:] == [("reduce", 2), ("reduce", 0)]
    for a, b in zip(solver.net.learnable_params, alone.net.learnable_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)  # (g + g) / 2 == g exactly
