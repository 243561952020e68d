"""Moka's solvers: the training loop and Caffe's six update rules.

``get_solver("solver.prototxt")`` builds the rule named by SolverParameter ``type`` (SGD,
Nesterov, AdaGrad, RMSProp, AdaDelta, Adam); ``solver.solve()`` trains as ``caffe train`` does.
"""

from solvers import adaptive, sgd  # noqa: F401  (registers the update rules)
from solvers.lr_policies import LR_POLICIES
from solvers.solver import SOLVERS, Solver, get_solver, register_solver

__all__ = ["LR_POLICIES", "SOLVERS", "Solver", "get_solver", "register_solver"]
