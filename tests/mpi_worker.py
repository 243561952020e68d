"""A training process for tests/test_distributed.py (run by ``mpiexec`` or alone).

``python tests/mpi_worker.py SOLVER OUT ITERS [options]`` trains ``ITERS`` iterations and saves
``OUT_rank<r>.npz``: every learnable parameter (``arr_0``...), the smoothed loss after each
iteration (``losses``) and the train net's data layer states as JSON (``data_state``).

Options: ``--mpi`` (one rank of a data-parallel job), ``--iter-size N``, ``--net NET`` (another
train net file), ``--restore STATE`` (resume a .solverstate first), ``--fail R:I`` (rank R raises
before iteration I).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import solvers
from engine import distributed
from engine.io import read_solver_param


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("solver")
    parser.add_argument("out")
    parser.add_argument("iters", type=int)
    parser.add_argument("--mpi", action="store_true")
    parser.add_argument("--iter-size", type=int, default=0)
    parser.add_argument("--net")
    parser.add_argument("--restore")
    parser.add_argument("--fail", default="-1:-1")
    args = parser.parse_args(argv)
    group = distributed.connect(force=True) if args.mpi else None
    if group is None:
        return train(args, None)
    return distributed.run_rank(group, lambda: train(args, group))


def train(args: argparse.Namespace, group) -> int:
    param = read_solver_param(args.solver)
    if args.iter_size:
        param.iter_size = args.iter_size
    if args.net:
        param.net = args.net
    solver = solvers.get_solver(param)
    rank = 0
    if group is not None:
        group.attach(solver)
        rank = group.rank
    if args.restore:
        solver.restore(args.restore)
    fail_rank, fail_iter = (int(v) for v in args.fail.split(":"))
    losses = []
    for _ in range(args.iters):
        if rank == fail_rank and solver.iter == fail_iter:
            raise ValueError(f"injected failure before iteration {solver.iter}")
        solver.step(1)
        losses.append(solver.smoothed_loss)
    states = {layer.name: layer.get_state() for layer in solver.net.layers
              if hasattr(layer, "get_state")}
    np.savez(f"{args.out}_rank{rank}.npz", *[blob.data for blob in solver.net.learnable_params],
             losses=np.array(losses), data_state=json.dumps(states))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
