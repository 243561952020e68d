"""pycaffe's solver classes: ``caffe.SGDSolver("solver.prototxt")`` and its five siblings.

Each class is Moka's update rule built from a solver file, as pycaffe's constructors are: the
class decides the rule, whatever the file's ``type`` says (``get_solver`` follows ``type``).
As in pycaffe every class is an ``SGDSolver``; the rule's own class comes first in the bases so
its ``compute_update`` and state names are the ones used. The loop, snapshots and callbacks are
``solvers.Solver``'s; this module only adapts construction.
"""

from __future__ import annotations

import os
from os import PathLike

from engine.io import read_solver_param
from solvers.adaptive import AdaDelta, AdaGrad, Adam, RMSProp
from solvers.lr_policies import learning_rate
from solvers.sgd import SGD, Nesterov
from solvers.solver import SOLVERS, Solver


class SGDSolver(SGD):
    """``SGDSolver(filename)``: a solver from a solver prototxt (pycaffe's constructor)."""

    def __init__(self, filename: str | PathLike, allow_python: bool | None = None) -> None:
        path = os.fspath(filename)
        # a missing snapshot folder is made at the first snapshot, as `engine train` does
        super().__init__(read_solver_param(path), path=path, create_snapshot_folder=True,
                         allow_python=allow_python)

    @property
    def lr(self) -> float:
        """The learning rate the next update uses (pycaffe's ``SGDSolver.lr``)."""
        return learning_rate(self.param, self.iter, self.current_step)[0]

    def add_callback(self, on_start=None, on_gradients_ready=None) -> None:
        """pycaffe's callbacks; ``add_callback(nccl)`` is accepted and inert, as in a CPU build."""
        from engine.runtime import NCCL

        if isinstance(on_start, NCCL):
            return
        super().add_callback(on_start, on_gradients_ready)

    def share_weights(self, net) -> None:
        """Make ``net`` use this solver's training weights (pycaffe's ``share_weights``)."""
        net.share_with(self.net)


class NesterovSolver(Nesterov, SGDSolver):
    """``NesterovSolver(filename)``."""


class AdaGradSolver(AdaGrad, SGDSolver):
    """``AdaGradSolver(filename)``."""


class RMSPropSolver(RMSProp, SGDSolver):
    """``RMSPropSolver(filename)``."""


class AdaDeltaSolver(AdaDelta, SGDSolver):
    """``AdaDeltaSolver(filename)``."""


class AdamSolver(Adam, SGDSolver):
    """``AdamSolver(filename)``."""


PYCAFFE_SOLVERS: dict[str, type[SGDSolver]] = {
    "SGD": SGDSolver,
    "Nesterov": NesterovSolver,
    "AdaGrad": AdaGradSolver,
    "RMSProp": RMSPropSolver,
    "AdaDelta": AdaDeltaSolver,
    "Adam": AdamSolver,
}


def get_solver(filename: str | PathLike, allow_python: bool | None = None) -> Solver:
    """The solver a prototxt's ``type`` names (pycaffe's ``caffe.get_solver``).

    Caffe's six rules come back as the pycaffe classes above; a rule registered with
    ``solvers.register_solver`` is built by ``solvers.get_solver``. ``allow_python`` lets the
    nets' Python layers run (or call ``engine.allow_python_layers(True)`` once).
    """
    param = read_solver_param(filename)
    solver_class = PYCAFFE_SOLVERS.get(param.type)
    if solver_class is not None:
        return solver_class(filename, allow_python=allow_python)
    if param.type not in SOLVERS:
        from solvers.solver import get_solver as get_registered

        return get_registered(filename)  # raises the error that lists the known types
    return SOLVERS[param.type](param, path=os.fspath(filename), create_snapshot_folder=True,
                               allow_python=allow_python)


__all__ = [
    "PYCAFFE_SOLVERS",
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "NesterovSolver",
    "RMSPropSolver",
    "SGDSolver",
    "get_solver",
]
