"""Training logs as tables and pictures: ``engine parse-log`` and ``engine plot``.

``parse_log`` reads a Caffe or Moka training log (glog lines) exactly as Caffe's
tools/extra/parse_log.py does, and ``save_csv_files`` writes its two CSV files, ``LOG.train``
and ``LOG.test``, with the same columns, rows and number formatting:

- parsing starts after the first line containing ``Solving`` (its glog time is second 0; the
  year is the log file's ctime year, as extract_seconds.py takes it) and, within that, at the
  first line matching ``Iteration (\\d+)``;
- each ``Train net output #k: NAME = V`` / ``Test net output #k: NAME = V`` line fills a row
  ``NumIters, Seconds, LearningRate, NAME...`` for the current iteration; a row is written once
  it has as many columns as the first row (the first row when the next iteration's outputs
  start), and a last row still incomplete at the end is dropped, as in Caffe;
- ``LearningRate`` is the last ``lr = X`` seen (NaN before the first; the first row takes the
  second row's rate);
- numbers are Python floats written by the csv module (``100.0``, ``0.5``, ``nan``), rows end
  in ``\\r\\n`` (csv's excel dialect).

Unlike parse_log.py, a line without a glog prefix (a traceback, a progress line) is skipped
rather than ending the run.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from engine.errors import DataError, MokaError

ITERATION = re.compile(r"Iteration (\d+)")
TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
GLOG_STAMP = re.compile(r"^\s*[IWEF](\d\d)(\d\d) (\d+):(\d+):(\d+)\.(\d+)\s")

Row = dict[str, float]


def _stamp(line: str, year: int) -> datetime.datetime | None:
    """The time of a glog line (``I0210 13:39:22.381027 ...``), None if it has no prefix."""
    m = GLOG_STAMP.match(line)
    if not m:
        return None
    month, day, hour, minute, second, micros = (int(g) for g in m.groups())
    try:
        return datetime.datetime(year, month, day, hour, minute, second, micros)
    except ValueError:
        return None


def parse_log(path: str | os.PathLike) -> tuple[list[Row], list[Row]]:
    """The train and test rows of a training log, as parse_log.py's ``parse_log``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"log file '{path}' not found")
    year = datetime.datetime.fromtimestamp(os.path.getctime(path)).year
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    start = None
    for k, line in enumerate(lines):
        if "Solving" in line:
            start = _stamp(line.strip(), year)
            lines = lines[k + 1:]
            break
    if start is None:
        raise DataError(f"'{path}' has no 'Solving' line with a glog time stamp: it is not the "
                        "log of a training run (engine train / caffe train)")
    iteration = -1.0
    rate = math.nan
    train: list[Row] = []
    test: list[Row] = []
    train_row: Row | None = None
    test_row: Row | None = None
    for line in lines:
        match = ITERATION.search(line)
        if match:
            iteration = float(match.group(1))
        if iteration == -1:
            continue
        when = _stamp(line, year)
        if when is None:
            continue
        seconds = (when - start).total_seconds()
        match = LEARNING_RATE.search(line)
        if match:
            rate = float(match.group(1))
        train_row = _add_output(TRAIN_OUTPUT, train_row, train, line, iteration, seconds, rate)
        test_row = _add_output(TEST_OUTPUT, test_row, test, line, iteration, seconds, rate)
    for rows in (train, test):
        if len(rows) > 1:
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
    return train, test


def _add_output(pattern: re.Pattern, row: Row | None, rows: list[Row], line: str,
                iteration: float, seconds: float, rate: float) -> Row | None:
    match = pattern.search(line)
    if match:
        if not row or row["NumIters"] != iteration:
            if row:
                rows.append(row)
            row = {"NumIters": iteration, "Seconds": seconds, "LearningRate": rate}
        row[match.group(2)] = float(match.group(3))
    if row and rows and len(row) == len(rows[0]):
        rows.append(row)
        row = None
    return row


def write_csv(path: str | os.PathLike, rows: Sequence[Row], delimiter: str = ",") -> None:
    """One CSV file: the first row's keys as the header, Python's float text for values."""
    fields = list(rows[0]) if rows else ["NumIters", "Seconds", "LearningRate"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, dialect=csv.excel, delimiter=delimiter,
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def save_csv_files(log_path: str | os.PathLike, out_dir: str | os.PathLike,
                   delimiter: str = ",") -> tuple[Path, Path]:
    """Parse ``log_path`` and write ``OUT_DIR/<log name>.train`` and ``.test``; returns them."""
    train, test = parse_log(log_path)
    out = Path(out_dir)
    if not out.is_dir():
        raise DataError(f"output folder '{out}' does not exist")
    name = Path(log_path).name
    paths = out / f"{name}.train", out / f"{name}.test"
    write_csv(paths[0], train, delimiter)
    write_csv(paths[1], test, delimiter)
    return paths


# -- plots -----------------------------------------------------------------------------------------
def plot_logs(logs: Sequence[str | os.PathLike], out: str | os.PathLike,
              x: str = "iters") -> Path:
    """Draw training outputs, test outputs and the learning rate of every log into ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MokaError("engine plot needs matplotlib, an optional extra: "
                        "pip install \"moka[plot]\" (or pip install matplotlib)") from exc
    column = "Seconds" if x == "seconds" else "NumIters"
    runs = [(Path(p).name, *parse_log(p)) for p in logs]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    panels = (("training outputs", 1), ("test outputs", 2))
    for title, which in panels:
        ax = axes[which - 1]
        for name, train, test in runs:
            rows = train if which == 1 else test
            for output in _outputs(rows):
                ax.plot([r[column] for r in rows if output in r],
                        [r[output] for r in rows if output in r],
                        marker="." if len(rows) < 50 else None,
                        label=f"{name}: {output}" if len(runs) > 1 else output)
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    ax = axes[2]
    for name, train, test in runs:
        rows = train or test
        ax.plot([r[column] for r in rows], [r["LearningRate"] for r in rows], label=name)
    ax.set_title("learning rate")
    if len(runs) > 1:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("seconds" if column == "Seconds" else "iterations")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _outputs(rows: Sequence[Row]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in ("NumIters", "Seconds", "LearningRate"):
                names[key] = None
    return list(names)


# -- the command line ------------------------------------------------------------------------------
def parse_log_command(args) -> int:
    """Write a training log's LOG.train and LOG.test CSV files (Caffe's parse_log.py)."""
    for path in save_csv_files(args.log, args.out_dir, args.delimiter):
        print(f"Wrote {path}")
    return 0


def plot_command(args) -> int:
    """Plot loss, test outputs and learning rate of one or more training logs into a PNG."""
    if len(args.paths) < 2:
        raise MokaError("give one or more logs and the image to write: "
                        "engine plot LOG [LOG...] OUT.png")
    *logs, out = args.paths
    print(f"Wrote {plot_logs(logs, out, args.x)}")
    return 0


def add_commands(subparsers, add_command, net_state_flags) -> None:
    """Register ``engine parse-log`` and ``engine plot`` (from engine/cli.py)."""
    p = add_command(subparsers, parse_log_command, "parse-log")
    p.add_argument("log", metavar="LOG", help="a Caffe or Moka training log")
    p.add_argument("out_dir", metavar="OUTDIR", help="folder for LOG.train and LOG.test")
    p.add_argument("--delimiter", default=",", help="the CSV column delimiter (default ',')")
    p = add_command(subparsers, plot_command, "plot")
    p.add_argument("paths", nargs="+", metavar="FILE",
                   help="LOG [LOG ...] OUT.png: one or more training logs, then the image to "
                        "write")
    p.add_argument("--x", choices=("iters", "seconds"), default="iters",
                   help="the horizontal axis (default iters)")
