"""Learning-rate policies: ``SolverParameter.lr_policy`` → rate at update ``it``.

Each policy is a pure function ``(param, it) -> float`` in ``LR_POLICIES`` (Caffe's
``SGDSolver::GetLearningRate``); ``it`` is the number of updates already done, so update 0 uses
``lr(0)``. ``multistep`` also takes Caffe's ``current_step`` (see ``advance_step``): without it,
the step is the number of ``stepvalue`` entries already reached.

Moka adds ``plateau`` (the rate drops by ``gamma`` whenever the monitored value stops improving;
the drops so far are ``current_step``, kept by ``PlateauTracker``) and a linear warm-up
(``warmup_iter``, ``warmup_start_lr``) that ``learning_rate`` applies on top of every policy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from engine.errors import SolverError

log = logging.getLogger("solvers")


def _need(cond: bool, policy: str, message: str) -> None:
    if not cond:
        raise SolverError(f"lr_policy '{policy}': {message}")


def fixed(p, it: int) -> float:
    """base_lr."""
    return p.base_lr


def step(p, it: int) -> float:
    """base_lr * gamma ^ floor(it / stepsize)."""
    _need(p.stepsize > 0, "step", f"stepsize must be > 0; got {p.stepsize}")
    _need(p.gamma >= 0, "step", f"gamma must be >= 0; got {p.gamma}")
    return p.base_lr * p.gamma ** (it // p.stepsize)


def exp(p, it: int) -> float:
    """base_lr * gamma ^ it."""
    _need(p.gamma >= 0, "exp", f"gamma must be >= 0; got {p.gamma}")
    return p.base_lr * p.gamma**it


def inv(p, it: int) -> float:
    """base_lr * (1 + gamma * it) ^ (-power)."""
    _need(p.gamma >= 0, "inv", f"gamma must be >= 0; got {p.gamma}")
    return p.base_lr * (1.0 + p.gamma * it) ** (-p.power)


def multistep(p, it: int, current_step: int | None = None) -> float:
    """base_lr * gamma ^ current_step (Caffe's stateful step index, see ``advance_step``)."""
    if current_step is None:
        current_step = sum(1 for v in p.stepvalue if it >= v)
    return p.base_lr * p.gamma**current_step


def poly(p, it: int) -> float:
    """base_lr * (1 - it / max_iter) ^ power."""
    _need(p.max_iter > 0, "poly", f"max_iter must be > 0; got {p.max_iter}")
    try:
        return p.base_lr * math.pow(1.0 - it / p.max_iter, p.power)
    except ValueError:  # Caffe would train on with a NaN rate
        raise SolverError(f"lr_policy 'poly': iteration {it} is past max_iter {p.max_iter}, "
                          f"where (1 - it/max_iter)^{p.power:g} is undefined") from None


def sigmoid(p, it: int) -> float:
    """base_lr / (1 + exp(-gamma * (it - stepsize)))."""
    _need(p.stepsize > 0, "sigmoid", f"stepsize must be > 0; got {p.stepsize}")
    _need(p.gamma >= 0, "sigmoid", f"gamma must be >= 0; got {p.gamma}")
    z = -p.gamma * (it - p.stepsize)
    if z > 700.0:  # math.exp would overflow; the rate is 0 to double precision
        return 0.0
    return p.base_lr / (1.0 + math.exp(z))


def plateau(p, it: int, current_step: int = 0) -> float:
    """max(base_lr * gamma ^ drops, plateau_min_lr); ``current_step`` counts the drops."""
    return max(p.base_lr * p.gamma**current_step, p.plateau_min_lr)


LR_POLICIES: dict[str, Callable[..., float]] = {
    "fixed": fixed,
    "step": step,
    "exp": exp,
    "inv": inv,
    "multistep": multistep,
    "poly": poly,
    "sigmoid": sigmoid,
    "plateau": plateau,
}


def check_policy(p) -> None:
    """Raise SolverError for an lr_policy that is missing or unknown."""
    if p.lr_policy not in LR_POLICIES:
        raise SolverError(f"Unknown learning rate policy: '{p.lr_policy}' (known policies: "
                          f"{', '.join(LR_POLICIES)})")


def advance_step(p, it: int, current_step: int) -> int:
    """Caffe's ``current_step_`` after computing the rate at update ``it``.

    ``step`` recomputes it as ``it // stepsize``; ``multistep`` moves it forward by **at most
    one** per update, once ``it`` reaches ``stepvalue[current_step]`` (so repeated or unsorted
    stepvalues take one update each, as in Caffe); other policies leave it alone.
    """
    if p.lr_policy == "step" and p.stepsize > 0:
        return it // p.stepsize
    if (p.lr_policy == "multistep" and current_step < len(p.stepvalue)
            and it >= p.stepvalue[current_step]):
        return current_step + 1
    return current_step


def warmup(p, it: int, rate: float) -> float:
    """Linear warm-up from ``warmup_start_lr`` at update 0 to the policy's ``rate`` at update
    ``warmup_iter``: ``start + (rate - start) * it / warmup_iter`` while ``it < warmup_iter``."""
    if it >= p.warmup_iter:
        return rate
    start = p.warmup_start_lr
    return start + (rate - start) * (it / p.warmup_iter)


def learning_rate(p, it: int, current_step: int) -> tuple[float, int]:
    """The rate for update ``it`` and the new ``current_step`` (Caffe's GetLearningRate),
    warmed up when ``warmup_iter`` is set."""
    check_policy(p)
    current_step = advance_step(p, it, current_step)
    if p.lr_policy in ("multistep", "plateau"):
        rate = LR_POLICIES[p.lr_policy](p, it, current_step)
    else:
        rate = LR_POLICIES[p.lr_policy](p, it)
    return warmup(p, it, rate), current_step


class PlateauTracker:
    """``lr_policy: "plateau"``'s memory: the best monitored value and the rounds since.

    ``observe(value)`` is called once per round (every ``test_interval`` iterations) and says
    whether the rate should drop (the solver then adds one to ``current_step``). A value
    improves on the best when it is lower (mode min) or higher (mode max) by more than
    ``plateau_threshold * |best|``; NaN never improves. After a drop the count starts again,
    the best is kept.
    """

    def __init__(self, p, mode: str) -> None:
        self.patience = p.plateau_patience
        self.threshold = p.plateau_threshold
        self.mode = mode
        self.best: float | None = None
        self.bad_rounds = 0

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        margin = self.threshold * abs(self.best)
        if self.mode == "min":
            return value < self.best - margin
        return value > self.best + margin

    def observe(self, value: float) -> bool:
        """Record one round's value; True when the rate should drop now."""
        if self.improves(value):
            self.best, self.bad_rounds = float(value), 0
            return False
        self.bad_rounds += 1
        if self.bad_rounds >= self.patience:
            self.bad_rounds = 0
            return True
        return False
