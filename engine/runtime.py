"""pycaffe's remaining module-level names: ``Timer``, ``init_log``/``log``, and the multi-GPU
switches (``solver_count``, ``solver_rank``, ``set_multiprocess``, ``has_nccl``, ``NCCL``).

Moka trains in one process on the CPU, so the multi-GPU names behave as a CPU-only Caffe build's
do: ``has_nccl()`` is False, ``NCCL(solver, uid)`` can be built but has no ``new_uid``/``bcast``,
and adding it as a solver callback does nothing. The counts are kept so scripts read back what
they set.
"""

from __future__ import annotations

import logging
import sys
import time

log_ = logging.getLogger("engine")

_solver_count = 1
_solver_rank = 0
_multiprocess = False


class Timer:
    """A wall-clock stopwatch (Caffe's Timer): ``start()``, ``stop()``, ``ms``."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._elapsed = 0.0
        self._running = False
        self._has_run = False

    def start(self) -> None:
        if not self._running:
            self._start = time.perf_counter()
            self._running = True
            self._has_run = True

    def stop(self) -> None:
        if self._running:
            self._elapsed = time.perf_counter() - self._start
            self._running = False

    @property
    def ms(self) -> float:
        """Milliseconds between the last start and stop (stops a running timer, as Caffe)."""
        if not self._has_run:
            log_.warning("Timer has never been run before reading time.")
            return 0.0
        self.stop()
        return self._elapsed * 1000.0


def init_log(level: int = 0, stdout: bool = False) -> None:
    """Send Moka's log to stderr (or stdout) at glog ``level`` (0 INFO, 1 WARNING, 2 ERROR)."""
    levels = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}
    from engine.cli import GlogFormatter

    handler = logging.StreamHandler(sys.stdout if stdout else sys.stderr)
    handler.setFormatter(GlogFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(levels.get(int(level), logging.INFO))


def log(message: str) -> None:
    """Log one INFO line (pycaffe's ``caffe.log``)."""
    log_.info("%s", message)


def has_nccl() -> bool:
    """False: Moka has no NCCL (multi-GPU) support."""
    return False


class NCCL:
    """A CPU-only build's NCCL: constructible, inert (no ``new_uid``/``bcast``)."""

    def __init__(self, solver, uid) -> None:
        self.solver = solver
        self.uid = uid


def solver_count() -> int:
    return _solver_count


def set_solver_count(count: int) -> None:
    global _solver_count
    _solver_count = int(count)


def solver_rank() -> int:
    return _solver_rank


def set_solver_rank(rank: int) -> None:
    global _solver_rank
    _solver_rank = int(rank)


def set_multiprocess(multiprocess: bool) -> None:
    global _multiprocess
    _multiprocess = bool(multiprocess)
