"""Helpers for the solver tests: tiny nets written as prototxt files, solvers built from them."""

from __future__ import annotations

import numpy as np
import pytest

from solvers import get_solver

# Least squares: out = x·Wᵀ + b, loss = Σ(out - y)² / (2N). The test writes x and y.
LS_NET = """
name: "ls"
layer { name: "data" type: "Input" top: "x" top: "y"
  input_param { shape { dim: 6 dim: 3 } shape { dim: 6 dim: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "out" %(ip_params)s
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""

LS_X = np.random.default_rng(3).normal(size=(6, 3))
LS_Y = np.random.default_rng(4).normal(size=(6, 1))


def ls_net(ip_params: str = "") -> str:
    return LS_NET % {"ip_params": ip_params}


@pytest.fixture
def make_solver(tmp_path):
    """``make(solver_text, net_text=LS net, dtype=float64, name="solver")`` → a Solver.

    Writes ``net.prototxt`` and ``<name>.prototxt`` into tmp_path; the solver names the net by
    its absolute path unless the text already gives a net. Least-squares inputs are fed.
    """

    def make(solver_text: str, net_text: str | None = None, dtype=np.float64,
             name: str = "solver", **kwargs):
        net_path = tmp_path / "net.prototxt"
        net_path.write_text(ls_net() if net_text is None else net_text)
        if "net:" not in solver_text and "net_param" not in solver_text:
            solver_text = f'net: "{net_path}"\n{solver_text}'
        solver_path = tmp_path / f"{name}.prototxt"
        solver_path.write_text(solver_text)
        solver = get_solver(str(solver_path), dtype=dtype, **kwargs)
        feed(solver)
        return solver

    return make


def feed(solver) -> None:
    """Write the least-squares inputs into every net that has them."""
    for net in [solver.net, *solver.test_nets]:
        if "x" in net.inputs:
            net.blobs["x"].data[...] = LS_X
            net.blobs["y"].data[...] = LS_Y


def ls_gradients(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dL/dW and dL/db of the least-squares loss, by hand."""
    r = LS_X @ w.T + b - LS_Y
    n = len(LS_X)
    return r.T @ LS_X / n, r.sum(axis=0) / n


def params_of(solver) -> list[np.ndarray]:
    return [blob.data.copy() for blob in solver.net.learnable_params]
