"""Learning-rate policies: ``SolverParameter.lr_policy`` → rate at update ``it``.

Each policy is a pure function ``(param, it) -> float`` in ``LR_POLICIES`` (Caffe's
``SGDSolver::GetLearningRate``); ``it`` is the number of updates already done, so update 0 uses
``lr(0)``. ``multistep`` also takes Caffe's ``current_step`` (see ``advance_step``): without it,
the step is the number of ``stepvalue`` entries already reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from engine.errors import SolverError


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


LR_POLICIES: dict[str, Callable[..., float]] = {
    "fixed": fixed,
    "step": step,
    "exp": exp,
    "inv": inv,
    "multistep": multistep,
    "poly": poly,
    "sigmoid": sigmoid,
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


def learning_rate(p, it: int, current_step: int) -> tuple[float, int]:
    """The rate for update ``it`` and the new ``current_step`` (Caffe's GetLearningRate)."""
    check_policy(p)
    current_step = advance_step(p, it, current_step)
    if p.lr_policy == "multistep":
        return multistep(p, it, current_step), current_step
    return LR_POLICIES[p.lr_policy](p, it), current_step
