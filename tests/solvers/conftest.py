"""Fixtures for the solver tests; the helpers themselves live in solver_nets.py."""

from solver_nets import make_solver  # noqa: F401  (re-exported as a fixture)
