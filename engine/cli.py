"""The ``engine`` command: Caffe's ``caffe`` tool (train, test, time) on Moka.

``engine train SOLVER [--snapshot S.solverstate | --weights W.caffemodel[,W2]]``,
``engine test --model M --weights W --iterations N`` and ``engine time --model M --iterations N``
take Caffe's flags and log in glog's line shape, so Caffe's log tools (``parse_log.py``) read the
output. Caffe's data tools are here too: ``convert-imageset``, ``compute-image-mean`` and
``upgrade`` (engine/tools.py). A user error prints one line, ``engine: error: <message>``, and
exits non-zero; the traceback is shown only with ``--verbose``.

Flags are read as Caffe's gflags reads them: ``-solver s.prototxt``, ``-solver=s.prototxt``,
``--solver s.prototxt`` and ``--solver=s.prototxt`` are the same flag (``caffe_flags``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from engine.errors import DataError, MokaError
from engine.layer import TEST, TRAIN
from engine.python_layer import python_layers_allowed

log = logging.getLogger("engine.cli")

SIGNAL_EFFECTS = ("stop", "snapshot", "none")
_GLOG_LEVELS = {logging.DEBUG: "D", logging.INFO: "I", logging.WARNING: "W",
                logging.ERROR: "E", logging.CRITICAL: "F"}


class UsageError(MokaError):
    """A bad command line: a missing flag, a bad combination, an unknown option."""


# -- logging ---------------------------------------------------------------------------------
class GlogFormatter(logging.Formatter):
    """``I1121 01:23:45.678901 12345 solver.py:123] message``: glog's prefix, Python's file."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.localtime(record.created)
        micros = int((record.created % 1) * 1e6)
        level = _GLOG_LEVELS.get(record.levelno, "I")
        prefix = (f"{level}{stamp.tm_mon:02d}{stamp.tm_mday:02d} "
                  f"{time.strftime('%H:%M:%S', stamp)}.{micros:06d} {record.process} "
                  f"{record.filename}:{record.lineno}] ")
        text = prefix + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _LogSetup:
    """Installs a stderr handler on the root logger for one ``main`` call, then undoes it."""

    def __init__(self, level: int, stream: TextIO | None = None) -> None:
        self.root = logging.getLogger()
        # the stderr current at call time, or the progress line's wrapper of it
        self.handler = logging.StreamHandler(sys.stderr if stream is None else stream)
        self.handler.setFormatter(GlogFormatter())
        self.old_level = self.root.level
        self.level = level

    def __enter__(self) -> _LogSetup:
        self.root.addHandler(self.handler)
        self.root.setLevel(self.level)
        return self

    def __exit__(self, *exc: object) -> None:
        self.root.removeHandler(self.handler)
        self.root.setLevel(self.old_level)


# -- helpers ---------------------------------------------------------------------------------
def _stages(values: Sequence[str] | None) -> list[str]:
    """``--stage a,b --stage c`` → ``["a", "b", "c"]`` (Caffe splits the flag on commas)."""
    return [s for value in values or () for s in value.split(",") if s]


def _weight_files(value: str | None) -> list[str]:
    """``--weights a.caffemodel,b.caffemodel``: every file must exist."""
    files = [f for f in (value or "").split(",") if f]
    for f in files:
        _require_file(f, "weights file")
    return files


def _require_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        raise UsageError(f"{what} '{path}' not found (working directory: {os.getcwd()})")


def _fmt(value: float) -> str:
    """A float as C++'s ostream prints it (6 significant digits)."""
    return f"{value:g}"


def _build_net(model: str, phase: int, args: argparse.Namespace, recycle: bool = False):
    from engine.net import Net

    _require_file(model, "model file")
    return Net(model, phase=phase, level=args.level, stages=_stages(args.stage),
               rng=np.random.default_rng(0), recycle=recycle)


def _warn_gpu(args: argparse.Namespace) -> None:
    """Caffe's ``-gpu 0`` (or ``all``) is accepted; Moka says once that it runs on the CPU."""
    gpu = getattr(args, "gpu", None)
    if gpu is not None:
        log.warning("Moka runs on the CPU only: ignoring -gpu %s; %s continues on the CPU",
                    gpu, "training" if args.func is train else "the run")


# -- train -----------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    """Train or fine-tune a model from a solver prototxt."""
    from engine import distributed  # mpiexec -n K: one rank of a data-parallel job

    group = distributed.connect(force=args.mpi)
    if group is None:
        return _train(args, None)
    return distributed.run_rank(group, lambda: _train(args, group), verbose=args.verbose)


def _train(args: argparse.Namespace, group) -> int:
    from engine.io import read_solver_param

    _warn_gpu(args)
    path = _solver_path(args)
    if args.snapshot and args.snapshot != "latest":  # latest: see Solver.solve
        _require_file(args.snapshot, "snapshot")
    weights = _weight_files(args.weights)
    param = read_solver_param(path)
    param.train_state.level = args.level
    param.train_state.stage.extend(_stages(args.stage))
    if args.snapshot or weights:  # the flags override the file's weights, as Caffe's
        param.ClearField("weights")
        param.weights.extend(weights)
    if group is not None:
        group.share_seed(param)
    solver = _create_solver(param, path)
    if group is not None:
        group.attach(solver)
    solver.install_signal_handlers(sigint=args.sigint_effect, sighup=args.sighup_effect)
    if getattr(args, "status", None) is not None and (group is None or group.is_root):
        from engine.progress import TrainProgress

        solver.progress = TrainProgress(args.status, solver)
    if args.snapshot:
        log.info("Resuming from %s", args.snapshot)
    log.info("Starting Optimization")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # a NaN/Inf stops training with the layer named (solvers/divergence.py); numpy's own
        # warnings about it would only garble the log
        solver.solve(resume_file=args.snapshot)
    return 0


def _create_solver(param, path: str):
    """The solver for ``param``, told its file so relative net paths also resolve beside it."""
    import solvers  # the one engine module that imports solvers (DESIGN.md)

    solver_class = solvers.SOLVERS.get(param.type)
    if solver_class is None:
        return solvers.get_solver(param)  # raises the error that lists the known types
    # a missing snapshot folder is made at the first snapshot (Caffe would fail there instead),
    # so a run that fails earlier leaves no empty folder behind
    return solver_class(param, path=path, create_snapshot_folder=True)


def _solver_path(args: argparse.Namespace) -> str:
    given = [p for p in (args.solver_file, args.solver) if p]
    if not given:
        raise UsageError("need a solver definition to train: engine train SOLVER.prototxt "
                         "(or --solver=SOLVER.prototxt)")
    if len(given) == 2 and given[0] != given[1]:
        raise UsageError(f"two solvers given: '{given[0]}' and --solver='{given[1]}'; "
                         "give one")
    _require_file(given[0], "solver file")
    return given[0]


# -- test ------------------------------------------------------------------------------------
def test(args: argparse.Namespace) -> int:
    """Score a model: run TEST-phase forwards and average every output."""
    if not args.model:
        raise UsageError("need a model definition to score: --model NET.prototxt")
    if not args.weights:
        raise UsageError("need model weights to score: --weights W.caffemodel")
    _warn_gpu(args)
    weights = _weight_files(args.weights)
    net = _build_net(args.model, TEST, args, recycle=True)  # reads outputs only
    for f in weights:
        net.copy_from(f)
    log.info("Running for %d iterations.", args.iterations)
    progress = None
    if getattr(args, "status", None) is not None:
        from engine.progress import TestProgress

        progress = TestProgress(args.status, args.iterations)
    names = list(net.outputs)
    sums: list[np.ndarray] = [np.zeros(net.blobs[n].count, np.float64) for n in names]
    loss = 0.0
    for i in range(args.iterations):
        loss += net.forward_from_to()
        for name, total in zip(names, sums, strict=True):
            scores = net.blobs[name].data.reshape(-1)
            total += scores
            for score in scores:
                log.info("Batch %d, %s = %s", i, name, _fmt(float(score)))
        if progress is not None:
            progress.update(i + 1, loss)
    log.info("Loss: %s", _fmt(loss / args.iterations))
    for name, total in zip(names, sums, strict=True):
        weight = net.blob_loss_weights.get(name, 0.0)
        for mean in total / args.iterations:
            note = f" (* {_fmt(weight)} = {_fmt(weight * mean)} loss)" if weight else ""
            log.info("%s = %s%s", name, _fmt(float(mean)), note)
    return 0


# -- time ------------------------------------------------------------------------------------
def time_(args: argparse.Namespace) -> int:
    """Benchmark a model: average per-layer forward and backward times."""
    if not args.model:
        raise UsageError("need a model definition to time: --model NET.prototxt")
    _warn_gpu(args)
    phase = TRAIN if args.phase == "TRAIN" else TEST
    try:
        net = _build_net(args.model, phase, args)
        log.info("Performing Forward")
        log.info("Initial loss: %s", _fmt(net.forward_from_to()))
    except DataError as exc:
        raise DataError(f"{exc} (engine time runs the net's data layers, so their sources "
                        "must be readable from the working directory)") from exc
    log.info("Performing Backward")
    net.backward()
    forward_ms, backward_ms, totals = _time_layers(net, args.iterations)
    n = args.iterations
    log.info("Average time per layer: ")
    for layer, fwd, bwd in zip(net.layers, forward_ms, backward_ms, strict=True):
        log.info("%10s\tforward: %s ms.", layer.name, _fmt(fwd / n))
        log.info("%10s\tbackward: %s ms.", layer.name, _fmt(bwd / n))
    log.info("Average Forward pass: %s ms.", _fmt(totals["forward"] / n))
    log.info("Average Backward pass: %s ms.", _fmt(totals["backward"] / n))
    log.info("Average Forward-Backward: %s ms.", _fmt(totals["all"] / n))
    log.info("Total Time: %s ms.", _fmt(totals["all"]))
    log.info("*** Benchmark ends ***")
    return 0


def _time_layers(net, iterations: int) -> tuple[list[float], list[float], dict[str, float]]:
    """Caffe's loop: every layer forward, then every layer backward, each timed on its own.

    Returns the per-layer forward and backward totals and the whole-pass totals, all in ms.
    """
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    count = len(net.layers)
    forward_ms, backward_ms = [0.0] * count, [0.0] * count
    totals = {"forward": 0.0, "backward": 0.0, "all": 0.0}
    clock = time.perf_counter
    start_all = clock()
    for j in range(iterations):
        start_forward = clock()
        for i, layer in enumerate(net.layers):
            t0 = clock()
            layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
            layer.forward(net.bottom_vecs[i], net.top_vecs[i])
            forward_ms[i] += (clock() - t0) * 1e3
        start_backward = clock()
        totals["forward"] += (start_backward - start_forward) * 1e3
        for i in reversed(range(count)):
            t0 = clock()
            net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i],
                                   net.bottom_vecs[i])
            backward_ms[i] += (clock() - t0) * 1e3
        end = clock()
        totals["backward"] += (end - start_backward) * 1e3
        log.info("Iteration: %d forward-backward time: %s ms.", j + 1,
                 _fmt((end - start_forward) * 1e3))
    totals["all"] = (clock() - start_all) * 1e3
    return forward_ms, backward_ms, totals


# -- device query ----------------------------------------------------------------------------
def device_query(args: argparse.Namespace) -> int:
    """Show the CPU, BLAS library and threads Moka computes with (Caffe's device_query)."""
    from engine.device import device_report

    if args.gpu is not None:
        log.info("Querying the CPU (Moka has no GPU backend; -gpu %s names no device here)",
                 args.gpu)
    for line in device_report():
        log.info("%s", line)
    return 0


# -- data tools ------------------------------------------------------------------------------
def convert_imageset(args: argparse.Namespace) -> int:
    """Convert an image list (path label lines) to an LMDB of Datums (Caffe's convert_imageset)."""
    from engine.tools import convert_imageset as convert

    if args.backend != "lmdb":
        raise UsageError(f"--backend {args.backend} is not supported; only lmdb can be written")
    convert(args.root, args.list_file, args.db, gray=args.gray, shuffle=args.shuffle,
            resize_height=args.resize_height, resize_width=args.resize_width,
            check_size=args.check_size, encoded=args.encoded, encode_type=args.encode_type)
    return 0


def compute_image_mean(args: argparse.Namespace) -> int:
    """Compute the mean image of an LMDB of Datums (Caffe's compute_image_mean)."""
    from engine.tools import compute_image_mean as compute

    compute(args.db, args.output)
    return 0


def upgrade(args: argparse.Namespace) -> int:
    """Upgrade a legacy net or solver prototxt to the current format."""
    from engine.tools import upgrade_proto_text

    _require_file(args.input, "prototxt")
    upgrade_proto_text(args.input, args.output)
    return 0


# -- the parser ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as a UsageError (one line) instead of usage text + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(*, sub: bool) -> argparse.ArgumentParser:
    """``--verbose``/``--quiet`` for the main parser and every subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if sub else False  # a subcommand must not reset the main flag
    parent.add_argument("--verbose", "-v", action="store_true", default=default,
                        help="show tracebacks for errors")
    parent.add_argument("--quiet", "-q", action="store_true", default=default,
                        help="log only warnings and errors")
    parent.add_argument("--threads", type=int, metavar="N",
                        default=argparse.SUPPRESS if sub else None,
                        help="threads for Moka's batch steps and numpy's BLAS (default: "
                        "MOKA_NUM_THREADS, else the usable CPUs)")
    return parent


def _python_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-python", "--allow_python", action="store_true", default=None,
                        help="let the net's Python layers run their modules' code")


def _gpu_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", metavar="ID", help="accepted for Caffe's command lines; Moka "
                        "runs on the CPU only (a warning says so)")


def _memory_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-limit", "--memory_limit", metavar="SIZE",
                        help="refuse nets whose blobs need more (bytes, 512M, 4G, or 'none'); "
                             "default: the machine's available memory")


def _progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no_progress", "--no-progress", action="store_true",
                        help="no live progress line on a terminal (log lines only)")


def _net_state_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level", type=int, default=0, help="the net state's level")
    parser.add_argument("--stage", action="append", metavar="A,B",
                        help="net state stages, comma separated")


def _add_command(subparsers, func: Callable[[argparse.Namespace], int],
                 name: str) -> argparse.ArgumentParser:
    doc = (func.__doc__ or "").strip().splitlines()[0]
    parser = subparsers.add_parser(name, help=doc, description=doc, parents=[_common(sub=True)])
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="engine", parents=[_common(sub=False)],
                     description="Moka: train, test and time Caffe models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=False, metavar="COMMAND",
                                       parser_class=_Parser)

    p = _add_command(subparsers, train, "train")
    p.add_argument("solver_file", nargs="?", metavar="SOLVER", help="the solver prototxt")
    p.add_argument("--solver", help="the solver prototxt (as Caffe's flag)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--snapshot", help="a .solverstate to resume training from, or 'latest': "
                       "the newest complete snapshot under snapshot_prefix (none: start afresh)")
    group.add_argument("--weights", help="caffemodel(s) to fine-tune from, comma separated")
    _net_state_flags(p)
    _gpu_flag(p)
    _memory_flag(p)
    _python_flag(p)
    _progress_flag(p)
    for signal_name, default in (("sigint", "stop"), ("sighup", "snapshot")):
        p.add_argument(f"--{signal_name}_effect", choices=SIGNAL_EFFECTS, default=default,
                       help=f"what {signal_name.upper()} does while training "
                            f"(default {default})")
    p.add_argument("--mpi", action="store_true",
                   help="data-parallel over MPI ranks (implied under mpiexec -n K>1)")

    p = _add_command(subparsers, test, "test")
    p.add_argument("--model", help="the net prototxt (built in the TEST phase)")
    p.add_argument("--weights", help="the trained .caffemodel(s), comma separated")
    p.add_argument("--iterations", type=int, default=50, help="batches to score")
    _net_state_flags(p)
    _gpu_flag(p)
    _memory_flag(p)
    _python_flag(p)
    _progress_flag(p)

    p = _add_command(subparsers, time_, "time")
    p.add_argument("--model", help="the net prototxt")
    p.add_argument("--iterations", type=int, default=50, help="iterations to time")
    p.add_argument("--phase", choices=("TRAIN", "TEST"), default="TRAIN",
                   help="the phase to build the net in (default TRAIN)")
    _net_state_flags(p)
    _gpu_flag(p)
    _memory_flag(p)
    _python_flag(p)

    p = _add_command(subparsers, device_query, "device_query")
    _gpu_flag(p)

    p = _add_command(subparsers, convert_imageset, "convert-imageset")
    p.add_argument("root", metavar="ROOT/", help="folder the list's paths are relative to")
    p.add_argument("list_file", metavar="LISTFILE", help="lines of 'relative/path label'")
    p.add_argument("db", metavar="DB", help="the LMDB folder to write")
    p.add_argument("--gray", action="store_true", help="store gray images (one channel)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the lines first")
    p.add_argument("--backend", default="lmdb", help="the DB type (only lmdb)")
    p.add_argument("--resize_height", type=int, default=0, help="resize images to this height")
    p.add_argument("--resize_width", type=int, default=0, help="resize images to this width")
    p.add_argument("--check_size", action="store_true", help="check all images have one size")
    p.add_argument("--encoded", action="store_true", help="store encoded image bytes")
    p.add_argument("--encode_type", default="", choices=("", "png", "jpg"),
                   help="re-encode images as png or jpg (implies --encoded)")

    p = _add_command(subparsers, compute_image_mean, "compute-image-mean")
    p.add_argument("db", metavar="DB", help="an LMDB of Datums")
    p.add_argument("output", nargs="?", metavar="OUT.binaryproto",
                   help="where to write the 1xCxHxW mean")

    p = _add_command(subparsers, upgrade, "upgrade")
    p.add_argument("input", metavar="IN.prototxt", help="a legacy net or solver prototxt")
    p.add_argument("output", metavar="OUT.prototxt", help="where to write the upgraded file")

    from engine import check, features, layer_list, logs, summary  # each registers its own

    for module in (summary, logs, features, check, layer_list):
        module.add_commands(subparsers, _add_command, _net_state_flags)
    from engine import pytools  # caffe's python/ tools: classify, detect

    pytools.add_commands(subparsers, _add_command, _net_state_flags)
    from engine import draw  # caffe's python/draw_net.py

    draw.add_commands(subparsers, _add_command, _net_state_flags)
    return parser


# -- Caffe's flag spelling ---------------------------------------------------------------------
_SINGLE_DASH = re.compile(r"-([A-Za-z][A-Za-z0-9_-]+)(=.*)?", re.DOTALL)


def _long_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--name`` option of ``parser`` and of its subcommands."""
    names: set[str] = set()
    for action in parser._actions:
        names.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= _long_options(sub)
    return names


def caffe_flags(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """gflags' single-dash spelling to argparse's: ``-solver=x`` → ``--solver=x``.

    Only words that name a known long option are rewritten (so ``-v`` and a negative number stay
    as they are); everything after a bare ``--`` is left alone.
    """
    known = _long_options(parser)
    out: list[str] = []
    for k, word in enumerate(argv):
        if word == "--":
            return out + list(argv[k:])
        match = _SINGLE_DASH.fullmatch(word)
        if match and f"--{match.group(1)}" in known:
            word = "-" + word
        out.append(word)
    return out


# -- entry point -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the ``engine`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(caffe_flags(sys.argv[1:] if argv is None else argv, parser))
    except UsageError as exc:
        return _report(exc, verbose=False, status=2)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if args.version:
        from engine.device import version_line

        print(version_line())
        return 0
    if args.command is None:
        return _report(UsageError("need a command, e.g. engine train SOLVER.prototxt (see "
                                  "'engine --help')"), verbose=False, status=2)
    if getattr(args, "iterations", 1) < 1:
        return _report(UsageError("--iterations must be at least 1"), verbose=False, status=2)
    if args.threads is not None:
        if args.threads < 1:
            return _report(UsageError("--threads must be at least 1"), verbose=False, status=2)
        from engine import parallel

        parallel.set_num_threads(args.threads)
    level = logging.WARNING if args.quiet else logging.INFO
    args.status = _status_stream(args)
    allow_python = getattr(args, "allow_python", None)
    with _LogSetup(level, args.status), python_layers_allowed(allow_python):
        try:
            try:
                from engine.net import memory_limit

                with memory_limit(getattr(args, "memory_limit", None) or "default"):
                    return args.func(args)
            finally:
                if args.status is not None:  # before any error line: it must not share a line
                    args.status.clear()
        except (MokaError, OSError) as exc:
            return _report(exc, verbose=args.verbose)
        except KeyboardInterrupt:
            print("engine: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # a bug, not the user's fault: still one line by default
            return _report(exc, verbose=args.verbose, internal=True)


def _status_stream(args: argparse.Namespace):
    """The progress line's stream for train and test when stderr is a terminal, else None."""
    if args.command not in ("train", "test") or args.no_progress:
        return None
    isatty = getattr(sys.stderr, "isatty", None)
    if not (isatty and isatty()):
        return None
    from engine.progress import StatusStream

    return StatusStream(sys.stderr)


def _report(exc: BaseException, *, verbose: bool, status: int = 1,
            internal: bool = False) -> int:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, OSError) and exc.filename is not None:
        message = f"{exc.strerror or exc}: '{exc.filename}'"
    else:
        message = str(exc) or type(exc).__name__
    if internal:
        message = f"internal error: {type(exc).__name__}: {message}"
        if not verbose:
            message += " (run with --verbose for the traceback)"
    print(f"engine: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return status
