"""Synchronous data-parallel training over MPI: ``mpiexec -n K engine train solver.prototxt``.

Caffe's multi-GPU semantics on K processes (ranks), through ``mpi4py`` (imported only here, and
only when the process was launched by ``mpiexec`` with K > 1 or ``engine train --mpi``):

- Every rank builds the same nets from the same ``random_seed`` (rank 0's, drawn by it when the
  solver sets none); before training the ranks compare a CRC of their parameters
  (``check_identical``) and stop if one differs. Random draws (dropout masks, random crops) are
  the same stream on every rank, applied to different records.
- The training nets' data layers split the record stream: record ``i`` goes to rank ``i mod K``
  (``DataLayer.share``). Their read position stays the *global* cursor (the records all ranks
  consumed together), identical on every rank, so a snapshot resumes on any K, or on one process.
- After backward the parameter diffs are summed over the ranks and scaled by 1/K (``finish``),
  before the solver's clip/normalise/decay/update: K ranks at batch B make the update one
  process makes with ``iter_size: K`` on the same records (grouped differently into batches, so
  equal to float32 rounding). The smoothed loss is the ranks' mean (the "Train net output"
  lines show rank 0's own batch, as in Caffe).
- ``layer_wise_reduce`` (default true): during the last ``iter_size`` pass a non-blocking
  allreduce starts for each layer's parameters as soon as their last user's backward has run,
  overlapping with the backward of the layers below; otherwise one fused allreduce follows
  backward. Only diffs are reduced: BatchNorm's statistics stay per rank, as in Caffe.
- One voice: rank 0 alone logs, tests and snapshots. Signals are OR-ed over the ranks after every
  iteration, so all ranks stop (or snapshot) after the same one. A failure on any rank prints
  ``rank r of K: message`` and aborts the whole job (``fail``), so nothing waits forever.

Waiting on MPI polls with short sleeps instead of MPI's busy-wait, so ranks oversubscribing the
cores (more ranks than cores) hand their core to a rank that computes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import zlib
from collections.abc import Callable

import numpy as np

from engine.errors import MokaError

log = logging.getLogger(__name__)

# how launchers announce the job size: MPICH/Intel MPI (hydra), Open MPI, MVAPICH
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
INSTALL_HINT = 'pip install "moka[mpi]" (mpi4py and MPICH)'
ABORT_GRACE_S = 0.3  # a failing rank waits this long after its message before aborting


class DistributedError(MokaError):
    """MPI missing for a multi-process launch, or ranks that disagree."""


def launched_ranks(environ=os.environ) -> tuple[int, int]:
    """(rank, size) that a launcher announced in the environment; (0, 1) when none did."""
    for size_name, rank_name in zip(SIZE_VARIABLES, RANK_VARIABLES, strict=True):
        if environ.get(size_name, "").isdigit():
            size = int(environ[size_name])
            rank = int(environ[rank_name]) if environ.get(rank_name, "").isdigit() else 0
            return rank, max(size, 1)
    return 0, 1


def connect(force: bool = False) -> DataParallel | None:
    """The job's DataParallel when launched with several ranks (or ``force``), else None."""
    rank, size = launched_ranks()
    if size == 1 and not force:
        return None
    try:
        import mpi4py

        mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
        from mpi4py import MPI
    except ImportError as exc:
        launch = (f"rank {rank} of {size}: launched as one of {size} MPI processes" if size > 1
                  else "--mpi asks for MPI")
        raise DistributedError(
            f"{launch}, but mpi4py cannot be imported ({exc}); install the MPI extra: "
            f"{INSTALL_HINT}, or run one process without mpiexec") from exc
    return DataParallel(MPI)


class DataParallel:
    """One rank of a data-parallel job: shares data, reduces gradients, agrees on signals."""

    def __init__(self, mpi, comm=None) -> None:
        self.MPI = mpi
        self.comm = comm if comm is not None else mpi.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.layer_wise = True
        self._requests: list = []
        self._armed = False  # start each layer's reduction after its backward (this pass)
        self._started: set[int] = set()
        self._last_user: dict[int, list[int]] = {}
        # per-iteration measurements: seconds waiting on the reduction, bytes reduced
        self.reduce_seconds = 0.0
        self.reduce_bytes = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- set-up -----------------------------------------------------------------------------
    def share_seed(self, param) -> None:
        """Give every rank rank 0's ``random_seed`` (a fresh one when the solver sets none), so
        that all ranks build the same nets."""
        seed = param.random_seed
        if self.is_root and seed < 0:
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
            log.info("No random_seed in the solver: all %d ranks use %d", self.size, seed)
        param.random_seed = self.comm.bcast(seed, root=0)

    def attach(self, solver) -> None:
        """Share the train net's data, check the ranks agree, and become ``solver.reducer``."""
        self.layer_wise = bool(solver.param.layer_wise_reduce)
        share_data(solver.net, self.rank, self.size)
        self.check_identical(solver.net)
        self._last_user = _params_by_last_backward(solver.net)
        solver.net.after_backward(lambda i: self._layer_done(solver.net, i))
        solver.reducer = self
        log.info("Data-parallel training on %d MPI ranks: record i goes to rank i mod %d; "
                 "gradients summed and scaled by 1/%d (%s)", self.size, self.size, self.size,
                 "per-layer allreduce overlapping backward" if self.layer_wise
                 else "one allreduce after backward")

    def check_identical(self, net) -> None:
        """Stop unless every rank holds the same parameters (a CRC of their bytes, gathered)."""
        crc = 0
        for blob in net.learnable_params:
            crc = zlib.crc32(np.ascontiguousarray(blob.data).tobytes(), crc)
        crcs = self.comm.allgather(crc)
        differ = [r for r, value in enumerate(crcs) if value != crcs[0]]
        if differ:
            raise DistributedError(
                f"rank(s) {differ} start from other parameters than rank 0; every rank must "
                "read the same net, solver and weights files (on a shared filesystem), so that "
                "the same random_seed builds the same net")
        log.info("Parameters identical on all %d ranks (CRC %08x)", self.size, crcs[0])

    # -- the gradient reduction ---------------------------------------------------------------
    def start(self, net) -> None:
        """Before the last backward pass: reduce each layer's diffs as soon as they are final."""
        self._requests, self._started = [], set()
        self._armed = self.layer_wise

    def _layer_done(self, net, i: int) -> None:
        if not self._armed:
            return
        for k in self._last_user.get(i, ()):
            diff = net.learnable_params[k].diff
            self._requests.append(self.comm.Iallreduce(self.MPI.IN_PLACE, diff,
                                                       op=self.MPI.SUM))
            self._started.add(k)
        if self._requests:  # MPICH moves messages along only inside MPI calls
            self.MPI.Request.Testall(self._requests)

    def finish(self, net, loss: float, current_step: int) -> tuple[float, int]:
        """Sum the diffs over the ranks and scale them by 1/K; returns the ranks' mean loss and
        rank 0's lr step (lr_policy "plateau" decides it from rank 0's tests)."""
        self._armed = False
        begin = time.perf_counter()
        rest = [blob for k, blob in enumerate(net.learnable_params) if k not in self._started]
        fused = np.concatenate([blob.diff.ravel() for blob in rest]) if rest else None
        if fused is not None:
            self._requests.append(self.comm.Iallreduce(self.MPI.IN_PLACE, fused,
                                                       op=self.MPI.SUM))
        scalars = np.array([loss, current_step if self.is_root else 0], np.float64)
        self._requests.append(self.comm.Iallreduce(self.MPI.IN_PLACE, scalars,
                                                   op=self.MPI.SUM))
        self.wait(self._requests)
        self._requests = []
        offset = 0
        for blob in rest:
            blob.diff[...] = fused[offset:offset + blob.diff.size].reshape(blob.diff.shape)
            offset += blob.diff.size
        scale = 1.0 / self.size
        if self.size > 1:
            for blob in net.learnable_params:
                blob.diff *= scale
        self.reduce_seconds = time.perf_counter() - begin
        self.reduce_bytes = sum(blob.diff.nbytes for blob in net.learnable_params)
        return float(scalars[0]) * scale, int(scalars[1])

    def mean(self, value: float) -> float:
        """The ranks' mean of ``value``."""
        buffer = np.array([value], np.float64)
        self.wait([self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)])
        return float(buffer[0]) / self.size

    def agree(self, flags: dict[int, bool]) -> dict[int, bool]:
        """The flags any rank has set, the same on every rank. Local flags are taken (cleared)
        before the exchange: a signal arriving meanwhile waits for the next round, so that no
        rank acts on something the others did not see."""
        keys = sorted(flags)
        taken = np.array([flags[k] for k in keys], np.int32)
        for k, value in zip(keys, taken, strict=True):
            if value:
                flags[k] = False
        self.wait([self.comm.Iallreduce(self.MPI.IN_PLACE, taken, op=self.MPI.MAX)])
        return {k: bool(value) for k, value in zip(keys, taken, strict=True)}

    def wait(self, requests: list) -> None:
        """Wait for ``requests`` polling with growing sleeps (MPI's own wait spins a core)."""
        polls = 0
        while not self.MPI.Request.Testall(requests):
            polls += 1
            if polls > 20:
                time.sleep(min(1e-3, 1e-5 * polls))

    # -- failures -----------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """Print ``message`` naming this rank and abort every rank of the job (no hang)."""
        print(f"engine: error: rank {self.rank} of {self.size}: {message}", file=sys.stderr,
              flush=True)
        # The launcher relays a rank's stderr through a pipe; an abort that reaches it first
        # kills the job with the message still unread (seen now and then in full test runs: an
        # empty stderr). A moment's wait lets the message out; it costs only a failing job.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(1)


def share_data(net, rank: int, size: int) -> None:
    """Give rank ``rank`` its share of every record-reading layer of ``net`` (i mod size)."""
    for layer in net.layers:
        if getattr(layer, "get_state", None) is None:
            continue  # Input, DummyData: nothing to split
        if not getattr(layer, "shareable", False):
            raise DistributedError(
                f"layer '{layer.name}' ({layer.type}) cannot split its records between MPI "
                "ranks; use a Data, HDF5Data or ImageData layer for data-parallel training")
        layer.share(rank, size)


def _params_by_last_backward(net) -> dict[int, list[int]]:
    """{layer index: learnable param indices whose diff is final once its backward has run}.

    Backward runs from the last layer to the first, so a shared parameter is final after its
    lowest-indexed user (Net's after_backward callbacks run for every layer, as in Caffe).
    """
    index = {id(blob): k for k, blob in enumerate(net.learnable_params)}
    first_user: dict[int, int] = {}
    for i, layer in enumerate(net.layers):
        for blob in layer.blobs:
            k = index.get(id(blob))
            if k is not None and k not in first_user:
                first_user[k] = i
    ready: dict[int, list[int]] = {}
    for k, i in sorted(first_user.items()):
        ready.setdefault(i, []).append(k)
    return ready


def run_rank(group: DataParallel, train: Callable[[], int], verbose: bool = False) -> int:
    """Run ``train`` as one rank: silent unless rank 0; any failure aborts the whole job."""
    if not group.is_root:
        logging.getLogger().setLevel(logging.ERROR)  # one voice: rank 0 logs
    try:
        return train()
    except BaseException as exc:  # the other ranks may wait in a collective: abort them all
        if verbose:
            traceback.print_exception(exc, file=sys.stderr)
        group.fail(describe(exc))
        raise


def describe(exc: BaseException) -> str:
    """One line for ``exc``: a MokaError's own message, else its type too."""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or exc}: '{exc.filename}'"
    elif isinstance(exc, MokaError):
        text = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.splitlines())
