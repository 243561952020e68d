"""Kill ``engine train`` with SIGKILL at random moments and resume it with ``--snapshot latest``.

Shared by tests/test_crash_safety.py (a few kills in CI) and tests/crash_campaign.py (100 and
more on demand). A tiny net (shuffled HDF5 rows, dropout, two InnerProducts) snapshots every
few iterations, so kills land while it trains, while it writes a snapshot and while it starts
or restores. After each kill the snapshot folder is audited: every file that looks like a
snapshot must be complete, and the newest pair must be loadable.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parent.parent

NET = """
name: "crash"
layer { name: "data" type: "HDF5Data" top: "x" top: "y"
  hdf5_data_param { source: "list.txt" batch_size: 4 shuffle: true } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "drop" type: "Dropout" bottom: "h" top: "h" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "out"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""

SOLVER = """net: "net.prototxt" type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999
lr_policy: "step" gamma: 0.9 stepsize: 50 weight_decay: 0.001 display: 0 average_loss: 5
max_iter: {max_iter} snapshot: {every} snapshot_prefix: "{prefix}" random_seed: 1701
{extra}
"""

SNAPSHOT = re.compile(r"crash_iter_(\d+)\.(caffemodel|solverstate)(\.h5)?")
LEFTOVER = re.compile(r"\..*\.tmp")


def write_run(folder: Path, max_iter: int, every: int = 3, hdf5: bool = False,
              name: str = "solver.prototxt", prefix: str = "snap/crash") -> Path:
    """The data, net and a solver file in ``folder``; returns the solver's path."""
    rng = np.random.default_rng(5)
    with h5py.File(folder / "rows.h5", "w") as f:  # 13 rows, batch 4: epochs end mid-batch
        f["x"] = rng.normal(size=(13, 3)).astype(np.float32)
        f["y"] = rng.normal(size=(13, 2)).astype(np.float32)
    (folder / "list.txt").write_text("rows.h5\n")
    (folder / "net.prototxt").write_text(NET)
    extra = "snapshot_format: HDF5" if hdf5 else ""
    solver = folder / name
    solver.write_text(SOLVER.format(max_iter=max_iter, every=every, prefix=prefix, extra=extra))
    return solver


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def train(folder: Path, solver: str = "solver.prototxt", *extra: str) -> subprocess.Popen:
    """``engine train SOLVER --snapshot latest`` in ``folder``; stderr goes to train.log."""
    log = open(folder / "train.log", "ab")  # noqa: SIM115 (closed by the caller via wait)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "engine", "train", solver, "--snapshot", "latest", *extra],
            cwd=folder, env=engine_env(), stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def snapshot_iters(folder: Path, kind: str = "solverstate") -> list[int]:
    names = os.listdir(folder) if folder.is_dir() else []
    return sorted(int(m.group(1)) for n in names
                  if (m := SNAPSHOT.fullmatch(n)) and m.group(2) == kind)


@dataclass
class Campaign:
    """What the kills found; ``problems`` must stay empty."""

    kills: int = 0
    outcomes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    leftovers: set[str] = field(default_factory=set)  # temporary files of cut-short writes
    orphans: set[int] = field(default_factory=set)  # killed between a model and its state

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
        return (f"{self.kills} kills ({counts}); {len(self.leftovers)} cut a snapshot write "
                f"short (left a temporary file), {len(self.orphans)} came between a model and "
                f"its state; resumed from iterations "
                f"{self.resumed_from[:5]}...{self.resumed_from[-3:]}; "
                f"{len(self.problems)} problems")


def audit(folder: Path, since: int = 0) -> tuple[list[str], set[str], set[int]]:
    """Every snapshot-looking file in ``folder`` from iteration ``since`` on checked, and the
    newest pair found: (problems, temporary files, iterations of models without their state)."""
    from engine.errors import MokaError
    from engine.io import read_net_binary
    from solvers import snapshot as snapshots

    problems, leftovers, orphans = [], set(), set()
    states = set(snapshot_iters(folder))
    for name in sorted(os.listdir(folder)):
        path = str(folder / name)
        match = SNAPSHOT.fullmatch(name)
        if match is None:
            if LEFTOVER.fullmatch(name):
                leftovers.add(name)
            else:
                problems.append(f"unexpected file {name}")
            continue
        if int(match.group(1)) < since:
            continue
        try:
            if match.group(2) == "solverstate":
                snapshots.check_snapshot(path)  # the state, its model, the model's checksum
            else:
                read_net_binary(path)
                if int(match.group(1)) not in states:
                    orphans.add(int(match.group(1)))
        except MokaError as exc:
            problems.append(f"{name} is damaged: {exc}")
    found = snapshots.find_latest(str(folder / "crash"))
    if states and found is None:
        problems.append("no loadable snapshot pair")
    return problems, leftovers, orphans


def kill_campaign(folder: Path, kills: int, seed: int = 0, timeout: float = 60.0) -> Campaign:
    """Start ``engine train --snapshot latest`` ``kills`` times, each killed with SIGKILL.

    Most kills come 0-30 ms after the run's first new snapshot appears (during training or a
    snapshot write); one in five comes 0-1.5 s after the start (while it starts or restores).
    """
    rng = np.random.default_rng(seed)
    snap = folder / "snap"
    result = Campaign()
    for _ in range(kills):
        before = snapshot_iters(snap)
        start_iter = before[-1] if before else 0
        early = rng.random() < 0.2
        proc = train(folder)
        started = time.monotonic()
        delay = rng.uniform(0, 1.5) if early else None
        while proc.poll() is None and time.monotonic() - started < timeout:
            if early and time.monotonic() - started >= delay:
                break
            if not early and any(i > start_iter for i in snapshot_iters(snap)):
                time.sleep(rng.uniform(0, 0.03))
                break
            time.sleep(0.002)
        if proc.poll() is not None:
            result.problems.append(f"engine train exited ({proc.returncode}) before the kill; "
                                   f"see {folder / 'train.log'}")
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        result.kills += 1
        result.outcomes["early kill (start/restore)" if early else "kill while training"] += 1
        result.resumed_from.append(start_iter)
        if snap.is_dir():
            problems, leftovers, orphans = audit(snap, since=start_iter)
            result.problems += problems
            result.leftovers |= leftovers
            result.orphans |= orphans
    return result


def finish_and_compare(folder: Path, extra_iters: int = 7,
                       hdf5: bool = False) -> tuple[int, list[str]]:
    """Resume once more and train to the end; compare with a run that was never killed.

    A second solver file stops ``extra_iters`` after the newest snapshot. The weights
    ``engine train --snapshot latest`` ends with must equal, bit for bit, those of the same
    solver trained in one go in this process (resume is exact). Returns (max_iter, problems).
    """
    from engine.io import read_net_binary
    from solvers import get_solver

    done = snapshot_iters(folder / "snap")
    max_iter = (done[-1] if done else 0) + extra_iters
    write_run(folder, max_iter, hdf5=hdf5, name="finish.prototxt")
    proc = train(folder, "finish.prototxt")
    if proc.wait(timeout=120) != 0:
        return max_iter, [f"the final resume failed; see {folder / 'train.log'}"]
    h5 = ".h5" if hdf5 else ""
    final = read_net_binary(folder / "snap" / f"crash_iter_{max_iter}.caffemodel{h5}")
    write_run(folder, max_iter, every=0, name="reference.prototxt", prefix="reference/crash")
    cwd = os.getcwd()
    os.chdir(folder)  # the net's data list is relative
    try:
        reference = get_solver("reference.prototxt")
        reference.param.snapshot_after_train = False
        reference.solve()
    finally:
        os.chdir(cwd)
    problems = []
    for layer in final.layer:
        for i, blob in enumerate(layer.blobs):
            ours = np.asarray(blob.data, np.float32)
            theirs = reference.net.params[layer.name][i].data.ravel()
            if not np.array_equal(ours, theirs):
                problems.append(f"after the kills, {layer.name} param {i} differs from an "
                                f"uninterrupted run by up to {np.abs(ours - theirs).max():g}")
    return max_iter, problems
