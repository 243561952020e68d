"""A solver's fields checked before any work starts (no net is built, no folder created).

``validate_solver_param(param, path)`` raises one ``SolverError`` listing every problem it finds
(the lr policy's parameters, the update rule's constraints, counts, the net and weights files,
whether the snapshot folder can be written) and returns the warnings worth a log line (a
``test_interval`` with nothing to test). Caffe finds most of these only when it reaches them
(a missing ``stepsize`` after both nets are built and the first test has run), some never.
"""

from __future__ import annotations

import itertools
import math
import os

from engine.errors import SolverError

ADAPTIVE_RULES = ("AdaGrad", "RMSProp", "AdaDelta", "Adam")
MONITOR_MODES = ("auto", "min", "max")


def validate_solver_param(param, path: str | None = None, *,
                          create_snapshot_folder: bool = False) -> list[str]:
    """Raise SolverError naming every problem in ``param``; return the warnings.

    ``path`` is the solver file: relative net paths are looked up in the working directory,
    then beside it (as the Solver does), and it prefixes the error message. The snapshot folder
    must exist and be writable, as in Caffe, unless ``create_snapshot_folder`` (``engine
    train``): then the nearest folder above it that exists must be writable, and the first
    snapshot creates it, so a run that fails before then leaves no empty folder behind.
    """
    problems: list[str] = []
    problems += _counts(param)
    problems += _policy(param)
    problems += _warmup(param)
    problems += _rule(param)
    problems += _files(param, path)
    problems += _snapshot_folder(param, create_snapshot_folder)
    if problems:
        where = f"{path}: " if path else ""
        raise SolverError(f"{where}invalid solver: {'; '.join(problems)}")
    return _warnings(param)


# -- counts and schedule -------------------------------------------------------------------------
def _counts(p) -> list[str]:
    out = []
    for field, low in (("max_iter", 0), ("display", 0), ("snapshot", 0), ("test_interval", 0),
                       ("average_loss", 1), ("iter_size", 1)):
        value = getattr(p, field)
        if value < low:
            out.append(f"{field} should be >= {low}; got {value}")
    for k, n in enumerate(p.test_iter):
        if n < 1:
            out.append(f"test_iter #{k} must be >= 1; got {n}")
    if p.base_lr < 0 or not math.isfinite(p.base_lr):
        out.append(f"base_lr must be a finite number >= 0; got {p.base_lr:g}")
    if p.weight_decay < 0:
        out.append(f"weight_decay must be >= 0; got {p.weight_decay:g}")
    if p.weight_decay and p.regularization_type not in ("L1", "L2"):
        out.append(f"Unknown regularization type: '{p.regularization_type}' (expected 'L2' or "
                   "'L1')")
    if p.test_iter and p.test_interval <= 0:
        out.append(f"test_interval must be > 0 when there are test nets (test_iter is set); "
                   f"got {p.test_interval}")
    out += _test_net_count(p)
    return out


def _train_net_fields(p) -> list[str]:
    return [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]


def _test_net_count(p) -> list[str]:
    """Caffe's InitTestNets counting: one test_iter per test net (``net`` may add the rest)."""
    out = []
    if p.HasField("net") and p.HasField("net_param"):
        out.append("Both net_param and net may not be specified")
    specific = len(p.test_net) + len(p.test_net_param)
    generic = p.HasField("net") or p.HasField("net_param")
    if len(p.test_iter) < specific or (not generic and len(p.test_iter) > specific):
        out.append(f"test_iter must be specified for each test network: {specific} test "
                   f"net(s), {len(p.test_iter)} test_iter")
    total = max(specific, len(p.test_iter)) if generic else specific
    if p.test_state and len(p.test_state) != total:
        out.append(f"test_state must be unspecified or specified once per test net; {total} "
                   f"test net(s), {len(p.test_state)} test_state")
    return out


def _warnings(p) -> list[str]:
    out = []
    plateau_uses_rounds = p.lr_policy == "plateau"
    if p.test_interval > 0 and not p.test_iter and not plateau_uses_rounds:
        out.append(f"test_interval is {p.test_interval} but there is no test net (no test_net "
                   "or test_net_param, and no test_iter to test the train net definition "
                   "with): nothing will be tested")
    return out


# -- the learning-rate policy --------------------------------------------------------------------
def _policy(p) -> list[str]:
    from solvers.lr_policies import LR_POLICIES

    policy = p.lr_policy
    if policy not in LR_POLICIES:
        return [f"Unknown learning rate policy: '{policy}' (known policies: "
                f"{', '.join(LR_POLICIES)})"]
    out = []

    def need(cond: bool, message: str) -> None:
        if not cond:
            out.append(f"lr_policy '{policy}' {message}")

    if policy in ("step", "sigmoid") and p.stepsize <= 0:
        what = "the iterations between drops" if policy == "step" else "the midpoint"
        need(False, f"needs stepsize > 0 ({what}); got {p.stepsize}" if p.HasField("stepsize")
             else f"needs stepsize ({what})")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid", "plateau"):
        need(p.HasField("gamma"), "needs gamma")
        need(p.gamma >= 0, f"needs gamma >= 0; got {p.gamma:g}")
    if policy == "inv":
        need(p.HasField("power"), "needs power")
    if policy == "poly":
        need(p.max_iter > 0, f"needs max_iter > 0; got {p.max_iter}")
        need(p.power >= 0, f"needs power >= 0; got {p.power:g}")
    if policy == "multistep":
        values = list(p.stepvalue)
        need(bool(values), "needs at least one stepvalue")
        need(all(a <= b for a, b in itertools.pairwise(values)),
             f"needs increasing stepvalues; got {values}")
        need(all(v >= 0 for v in values), f"needs stepvalues >= 0; got {values}")
    if policy == "plateau":
        need(0 < p.gamma < 1, f"needs 0 < gamma < 1 (the factor of each drop); got {p.gamma:g}")
        need(p.test_interval > 0, "needs test_interval > 0 (a round is test_interval "
             "iterations)")
        need(p.plateau_patience >= 1, f"needs plateau_patience >= 1; got {p.plateau_patience}")
        need(p.plateau_threshold >= 0,
             f"needs plateau_threshold >= 0; got {p.plateau_threshold:g}")
        need(p.plateau_min_lr >= 0, f"needs plateau_min_lr >= 0; got {p.plateau_min_lr:g}")
        need(p.plateau_mode in MONITOR_MODES, f"needs plateau_mode one of "
             f"{', '.join(MONITOR_MODES)}; got '{p.plateau_mode}'")
        need(bool(p.plateau_monitor), "needs plateau_monitor ('train_loss' or a test output name)")
        if p.plateau_monitor != "train_loss":
            need(bool(p.test_iter), f"monitors the test output '{p.plateau_monitor}' but there "
                 "is no test net (add test_iter)")
            need(0 <= p.plateau_test_net < max(1, len(p.test_iter)),
                 f"plateau_test_net {p.plateau_test_net} is not a test net index")
    return out


def _warmup(p) -> list[str]:
    out = []
    if p.warmup_iter < 0:
        out.append(f"warmup_iter must be >= 0; got {p.warmup_iter}")
    if p.warmup_start_lr < 0 or not math.isfinite(p.warmup_start_lr):
        out.append(f"warmup_start_lr must be a finite number >= 0; got {p.warmup_start_lr:g}")
    if p.HasField("warmup_start_lr") and p.warmup_iter == 0:
        out.append("warmup_start_lr is set but warmup_iter is 0 (set warmup_iter to the "
                   "iterations the warm-up lasts)")
    return out


# -- the update rule -----------------------------------------------------------------------------
def _rule(p) -> list[str]:
    from solvers.solver import SOLVERS

    rule = p.type
    if rule not in SOLVERS:
        return [f"unknown solver type '{rule}' (known types: {', '.join(sorted(SOLVERS))})"]
    out = []
    if rule in ("SGD", "Nesterov", "AdaDelta") and not 0 <= p.momentum < 1:
        what = "momentum (AdaDelta's decay rho)" if rule == "AdaDelta" else "momentum"
        out.append(f"{rule} needs 0 <= {what} < 1; got {p.momentum:g}")
    if rule in ("AdaGrad", "RMSProp") and p.momentum != 0:
        out.append(f"Momentum cannot be used with {rule}; got momentum {p.momentum:g} (set it "
                   "to 0 or remove it)")
    if rule == "RMSProp" and not 0 <= p.rms_decay < 1:
        out.append(f"rms_decay should lie between 0 and 1 (0 <= rms_decay < 1); got "
                   f"{p.rms_decay:g}")
    if rule == "Adam":
        if not 0 <= p.momentum < 1:
            out.append(f"Adam needs 0 <= beta1 (momentum) < 1; got {p.momentum:g}")
        if not 0 <= p.momentum2 < 1:
            out.append(f"Adam needs 0 <= beta2 (momentum2) < 1; got {p.momentum2:g}")
    if rule in ADAPTIVE_RULES and not p.delta > 0:
        out.append(f"{rule} needs delta > 0 (it keeps the division finite); got {p.delta:g}")
    return out


# -- files ---------------------------------------------------------------------------------------
def find_file(name: str, solver_path: str | None) -> str | None:
    """``name`` as Caffe reads it (the working directory), else beside the solver file."""
    if os.path.exists(name):
        return name
    if solver_path is not None:
        beside = os.path.join(os.path.dirname(solver_path), name)
        if os.path.exists(beside):
            return beside
    return None


def _files(p, path: str | None) -> list[str]:
    out = []
    train = _train_net_fields(p)
    if len(train) != 1:
        out.append("SolverParameter must specify exactly one train net using one of net, "
                   f"net_param, train_net, train_net_param; found {train or 0}")
    named = [(f, getattr(p, f)) for f in ("net", "train_net") if p.HasField(f)]
    named += [("test_net", n) for n in p.test_net]
    named += [("weights", w.strip()) for spec in p.weights for w in spec.split(",") if w.strip()]
    for field, name in named:
        if find_file(name, path) is None:
            where = f" or beside the solver file {path}" if path else ""
            out.append(f"{field} file '{name}' not found (looked in {os.getcwd()}{where})")
    return out


def _snapshot_folder(p, create: bool) -> list[str]:
    """The snapshot folder (or, if it may be created, the nearest one above) is writable."""
    if not (p.snapshot > 0 or (create and p.snapshot_after_train)):
        return []  # Caffe probes the folder only for periodic snapshots
    if p.snapshot > 0 and not p.snapshot_prefix:
        return ["snapshot is specified but snapshot_prefix is not"]
    prefix = p.snapshot_prefix
    folder = os.path.dirname(os.path.abspath(prefix or "x"))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    problem = None
    if not os.path.isdir(existing):
        problem = f"'{existing}' is a file, not a folder"
    elif existing != folder and not create:
        problem = f"the folder '{folder}' does not exist (create it; engine train does)"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"the folder '{existing}' is not writable"
    if problem:
        return [f"Cannot write to snapshot prefix '{prefix}': {problem}"]
    return []
