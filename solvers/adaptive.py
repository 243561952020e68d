"""Adaptive update rules: ``type: "AdaGrad" | "RMSProp" | "AdaDelta" | "Adam"``.

SolverParameter fields: ``delta`` (the epsilon of all four), ``rms_decay`` (RMSProp),
``momentum`` (AdaDelta's rho, Adam's beta1), ``momentum2`` (Adam's beta2). The state names are
listed in Caffe's .solverstate history order: all params' first state, then all params' second.
"""

from __future__ import annotations

import math

import numpy as np

from engine.errors import SolverError
from solvers.solver import Solver, register_solver


@register_solver
class AdaGrad(Solver):
    """``H += g^2``; step = ``lr * g / (sqrt(H) + delta)``. Momentum must be 0 (Caffe)."""

    state_names = ("history",)

    def check_param(self) -> None:
        if self.param.momentum != 0:
            raise SolverError(f"Momentum cannot be used with AdaGrad; got momentum "
                              f"{self.param.momentum} (set it to 0 or remove it)")

    def update_elements(self, grad: np.ndarray, state: dict[str, np.ndarray],
                        local_rate: float) -> np.ndarray:
        h = state["history"]
        h += np.square(grad)
        denom = np.sqrt(h)
        denom += self.param.delta
        grad /= denom
        grad *= local_rate
        return grad


@register_solver
class RMSProp(Solver):
    """``H = d * H + (1 - d) * g^2``; step = ``lr * g / (sqrt(H) + delta)``, d = rms_decay.

    Momentum must be 0 and 0 <= rms_decay < 1 (Caffe).
    """

    state_names = ("history",)

    def check_param(self) -> None:
        if self.param.momentum != 0:
            raise SolverError(f"Momentum cannot be used with RMSProp; got momentum "
                              f"{self.param.momentum} (set it to 0 or remove it)")
        if not 0 <= self.param.rms_decay < 1:
            raise SolverError(f"rms_decay should lie between 0 and 1 (0 <= rms_decay < 1); "
                              f"got {self.param.rms_decay}")

    def update_elements(self, grad: np.ndarray, state: dict[str, np.ndarray],
                        local_rate: float) -> np.ndarray:
        d = self.param.rms_decay
        h = state["history"]
        h *= d
        h += (1.0 - d) * np.square(grad)
        denom = np.sqrt(h)
        denom += self.param.delta
        grad /= denom
        grad *= local_rate
        return grad


@register_solver
class AdaDelta(Solver):
    """Zeiler's AdaDelta with rho = momentum, scaled by the rate (Caffe's examples use 1.0).

    ``G = m * G + (1 - m) * g^2``; ``u = g * sqrt((U + delta) / (G + delta))``;
    ``U = m * U + (1 - m) * u^2``; step = ``lr * u``.
    """

    state_names = ("history", "update_history")

    def update_elements(self, grad: np.ndarray, state: dict[str, np.ndarray],
                        local_rate: float) -> np.ndarray:
        m, delta = self.param.momentum, self.param.delta
        g2, u2 = state["history"], state["update_history"]
        g2 *= m
        g2 += (1.0 - m) * np.square(grad)
        ratio = u2 + delta
        ratio /= g2 + delta
        grad *= np.sqrt(ratio)  # grad is now the unscaled update u
        u2 *= m
        u2 += (1.0 - m) * np.square(grad)
        grad *= local_rate
        return grad


@register_solver
class Adam(Solver):
    """Adam with beta1 = momentum, beta2 = momentum2, t = iter + 1.

    ``M = b1 * M + (1 - b1) * g``; ``V = b2 * V + (1 - b2) * g^2``;
    step = ``lr * sqrt(1 - b2^t) / (1 - b1^t) * M / (sqrt(V) + delta)``. As in Caffe the bias
    correction is folded into the rate, so delta sits on the *uncorrected* sqrt(V).
    """

    state_names = ("m", "v")

    def update_elements(self, grad: np.ndarray, state: dict[str, np.ndarray],
                        local_rate: float) -> np.ndarray:
        b1, b2 = self.param.momentum, self.param.momentum2
        m, v = state["m"], state["v"]
        t = self.iter + 1
        correction = math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        m *= b1
        m += (1.0 - b1) * grad
        v *= b2
        v += (1.0 - b2) * np.square(grad)
        step = grad  # the gradient is no longer needed
        np.sqrt(v, out=step)
        step += self.param.delta
        np.divide(m, step, out=step)
        step *= local_rate * correction
        return step
