"""Momentum update rules: ``type: "SGD"`` and ``type: "Nesterov"`` (SolverParameter ``momentum``).

Both keep one history blob per learnable parameter, so their .solverstate files are Caffe's.
"""

from __future__ import annotations

import numpy as np

from solvers.solver import Solver, register_solver


@register_solver
class SGD(Solver):
    """Stochastic gradient descent with momentum m: ``V = m * V + lr * g``; step = V.

    As in Caffe, the rate is folded into the history, so after an lr drop the momentum still
    carries steps taken at the old rate (PyTorch scales the whole buffer by the current lr).
    """

    state_names = ("history",)

    def update_elements(self, grad: np.ndarray, state: dict[str, np.ndarray],
                        local_rate: float) -> np.ndarray:
        v = state["history"]
        v *= self.param.momentum
        grad *= local_rate  # in place: the diff is scratch by now
        v += grad
        return v


@register_solver
class Nesterov(Solver):
    """Nesterov momentum: ``V' = m * V + lr * g``; step = ``(1 + m) * V' - m * V``.

    Only V is kept between updates (the previous V is a temporary, as in Caffe).
    """

    state_names = ("history",)

    def update_elements(self, grad: np.ndarray, state: dict[str, np.ndarray],
                        local_rate: float) -> np.ndarray:
        m = self.param.momentum
        v = state["history"]
        v_prev = v.copy()
        v *= m
        v += local_rate * grad
        # step back along the old momentum, then over-step along the new one
        step = grad  # the gradient is consumed: reuse its buffer for the step
        np.multiply(v, 1.0 + m, out=step)
        step -= m * v_prev
        return step
