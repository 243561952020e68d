"""Batch-parallel helpers for the memory-bound numpy steps of the vision layers.

numpy releases the GIL inside copies and ufunc loops over large arrays, so a few threads working
on disjoint ranges of the batch axis run those steps in parallel. Each batch item is computed
exactly as it would be on one thread, so results are bit-identical for every thread count (exact
resume depends on it). Never call these around a BLAS GEMM: BLAS already uses every core; GEMMs
that Moka's threads run side by side go inside ``single_threaded_blas`` (``for_each_block``).

One count, set explicitly, drives both Moka's threads and numpy's BLAS threads:
``MOKA_NUM_THREADS`` if set, else the CPUs this process may use; ``set_num_threads`` (the CLI's
``--threads``) changes both later. Moka's batch steps use at most ``DEFAULT_MAX_THREADS`` of them
unless the count was given explicitly. The BLAS count is applied through ``threadpoolctl`` (a
core dependency: the BLAS that numpy loaded is found and set at run time, whatever the import
order or ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS`` say); with one thread everything runs
inline, without a pool. ``thread_configuration()`` reports what is in force.

OpenBLAS's worker threads busy-wait for about 0.1 s after each call before they sleep, so in a
training step, GEMM after GEMM, they hold the cores that these threads need (measured: a 2-thread
max-pool ran 2x slower right after a GEMM than alone, slower than on one thread). Told by
``OPENBLAS_THREAD_TIMEOUT`` to sleep sooner, they free the cores (CIFAR10-quick iteration 125 ->
105 ms, measured). OpenBLAS reads that variable when it loads, so this module sets it (unless
set already) before anything imports numpy: ``engine/__init__.py`` imports it first. If numpy
was imported first, OpenBLAS is told to read its environment again and its idle workers are
shut down (the same call OpenBLAS makes in a forked child); the next BLAS call starts them
anew with the short timeout. Either import order ends in the same configuration (tested).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator

# log2 of the cycles an idle OpenBLAS worker spins before sleeping (OpenBLAS's default is 28).
BLAS_THREAD_TIMEOUT = "4"
# numpy (so OpenBLAS) loaded before us, and OpenBLAS read no timeout: it must read it again
_RELOAD_BLAS_TIMEOUT = "numpy" in sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in os.environ
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_THREAD_TIMEOUT)

import numpy  # noqa: E402, F401  (loads OpenBLAS after the variable above)
import threadpoolctl  # noqa: E402

DEFAULT_MAX_THREADS = 8  # memory-bound copies stop scaling long before the core count does
# Below this much work (array elements) per thread, a hand-off to a thread (15-50 us) costs
# more than it saves (a 2-thread copy breaks even near 256k float32, measured).
MIN_THREAD_WORK = 1 << 17

_local = threading.local()  # .busy: this thread is already running a range


class _Task:
    """One call run on a worker thread; ``wait`` returns once it ran and re-raises its error."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn, self.error = fn, None
        self.done = threading.Lock()
        self.done.acquire()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # handed to the waiting thread
            self.error = exc
        finally:
            self.done.release()

    def wait(self) -> BaseException | None:
        self.done.acquire()
        return self.error


class _Worker:
    """A daemon thread running the tasks put on its queue (a plain queue and a lock hand a task
    over in about half the time a ThreadPoolExecutor takes, measured ~15 vs ~30 us)."""

    def __init__(self, index: int) -> None:
        self.tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=f"moka-{index}", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.tasks.get().run()

    def submit(self, fn: Callable[[], None]) -> _Task:
        task = _Task(fn)
        self.tasks.put(task)
        return task


_workers: list[_Worker] = []
_workers_lock = threading.Lock()


def _threads_from_environment() -> int:
    value = os.environ.get("MOKA_NUM_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"MOKA_NUM_THREADS must be an integer; got {value!r}") from None
    return usable_cpus()


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _openblas_libraries() -> list[dict]:
    return [info for info in threadpoolctl.threadpool_info()
            if info.get("internal_api") == "openblas" and info.get("filepath")]


def _reload_openblas_timeout() -> None:
    """Make an already loaded OpenBLAS take ``OPENBLAS_THREAD_TIMEOUT`` from the environment:
    it re-reads its environment, and its idle workers are shut down, to be started again (with
    the new timeout) by the next call that needs them. Builds without these entry points keep
    their timeout."""
    for info in _openblas_libraries():
        try:
            library = ctypes.CDLL(info["filepath"])
            read_env, shutdown = library.openblas_read_env, library.blas_thread_shutdown_
        except (OSError, AttributeError):
            continue
        read_env()
        shutdown()


def blas_thread_timeout() -> int | None:
    """The idle-spin timeout (log2 cycles) OpenBLAS works with, or None when unknown or not
    OpenBLAS (0 is OpenBLAS's own default, 2**28 cycles)."""
    for info in _openblas_libraries():
        try:
            getter = ctypes.CDLL(info["filepath"]).openblas_thread_timeout
        except (OSError, AttributeError):
            continue
        getter.restype = ctypes.c_int
        return int(getter())
    return None


_threads = 1
_blas_threads = 1
_blas_controller: threadpoolctl.ThreadpoolController | None = None  # found on first use
_single_blas_depth = 0  # single_threaded_blas blocks open, on any thread
_single_blas_lock = threading.Lock()


def num_threads() -> int:
    """How many threads batch-parallel steps use."""
    return _threads


def blas_num_threads() -> int:
    """How many threads Moka asked numpy's BLAS to use."""
    return _blas_threads


def set_num_threads(threads: int | None) -> int:
    """Use ``threads`` threads from now on, in Moka's batch steps and in numpy's BLAS (None:
    from the environment again); returns Moka's previous count. Idle workers beyond the new
    count are kept for later."""
    global _threads, _blas_threads, _blas_controller
    previous = _threads
    if threads is None:
        _blas_threads = _threads_from_environment()
        explicit = bool(os.environ.get("MOKA_NUM_THREADS", "").strip())
        _threads = _blas_threads if explicit else min(_blas_threads, DEFAULT_MAX_THREADS)
    else:
        _threads = _blas_threads = max(1, int(threads))
    threadpoolctl.threadpool_limits(limits=_blas_threads, user_api="blas")
    _blas_controller = None  # looked up again: a BLAS loaded since is found too
    return previous


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS on one thread inside the block, on Moka's count again after it: for GEMMs that
    Moka's threads run side by side, each on its own part (``for_batch_blocks``). Setting the
    count is a call into the library (~1 us); a BLAS call from another thread meanwhile also
    runs on one thread. Nested (a block's GEMMs inside ``for_each_block``, on any of its
    threads), it leaves the count to the outermost, which sets it back."""
    global _blas_controller, _single_blas_depth
    if _blas_controller is None:
        _blas_controller = threadpoolctl.ThreadpoolController().select(user_api="blas")
    libraries = _blas_controller.lib_controllers
    with _single_blas_lock:
        _single_blas_depth += 1
        if _single_blas_depth == 1:
            for library in libraries:
                library.set_num_threads(1)
    try:
        yield
    finally:
        with _single_blas_lock:
            _single_blas_depth -= 1
            if _single_blas_depth == 0:
                for library in libraries:
                    library.set_num_threads(_blas_threads)


def thread_configuration() -> dict:
    """What is in force: Moka's thread count, and per BLAS library its name, version, thread
    count and (OpenBLAS) idle timeout."""
    blas = [{"library": info.get("internal_api"), "version": info.get("version"),
             "threads": info.get("num_threads")}
            for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    return {"moka_threads": _threads, "blas": blas, "openblas_thread_timeout":
            blas_thread_timeout()}


def _worker(index: int) -> _Worker:
    """Worker thread ``index`` (1-based: the calling thread is worker 0), started on first use."""
    with _workers_lock:
        while len(_workers) < index:
            _workers.append(_Worker(len(_workers) + 1))
        return _workers[index - 1]


def _forget_workers() -> None:
    """A forked child has none of the parent's threads; it starts its own on demand."""
    global _workers_lock
    _workers.clear()
    _workers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def for_batch_blocks(fn: Callable[[int, int, int], None], n: int, item_work: int,
                     block_work: int | None = None) -> None:
    """Call ``fn(worker, start, stop)`` over consecutive ranges that cover ``range(n)``.

    The batch is split into one contiguous range per thread (fewer when each would get less
    than ``MIN_THREAD_WORK`` elements of work; ``item_work`` is the work of one item). With
    ``block_work``, each thread walks its range in blocks of about that much work, so that a
    block's temporaries stay in cache. ``worker`` (0 for the calling thread) tells the callers
    which per-thread scratch to use. Returns when every range is done; re-raises the first error.
    """
    if n <= 0:
        return
    item_work = max(1, item_work)
    threads = min(_threads, n, max(1, n * item_work // MIN_THREAD_WORK))
    if getattr(_local, "busy", False):
        threads = 1  # nested: the pool may be busy with the outer call
    block = n if block_work is None else max(1, block_work // item_work)
    bounds = [n * i // threads for i in range(threads + 1)]

    def work(worker: int) -> None:
        outer, _local.busy = getattr(_local, "busy", False), True
        try:
            for start in range(bounds[worker], bounds[worker + 1], block):
                fn(worker, start, min(start + block, bounds[worker + 1]))
        finally:
            _local.busy = outer

    if threads == 1:
        work(0)
        return
    tasks = [_worker(w).submit(lambda w=w: work(w)) for w in range(1, threads)]
    error: BaseException | None = None
    try:
        work(0)
    except BaseException as exc:  # wait for the others first: they write the same arrays
        error = exc
    for task in tasks:
        failure = task.wait()
        error = error or failure
    if error is not None:
        raise error


def for_each_block(fn: Callable[[int, int, int], None], n: int,
                   item_work: int = MIN_THREAD_WORK) -> None:
    """Call ``fn(worker, start, stop)`` over one contiguous range of ``range(n)`` per thread,
    for ``n`` independent blocks of work that each call BLAS (a convolution's batch blocks).
    ``item_work``: one block's work, as ``for_batch_blocks`` takes it (by default every block
    is worth a thread).

    Meanwhile BLAS runs on one thread per caller (``single_threaded_blas``), so a block's copies
    and GEMMs stay on one core and its cache, and the threads meet once per call instead of at
    every copy and inside every GEMM. Nested or on one thread: ``fn(0, 0, n)`` inline, BLAS as
    it is.
    """
    if n <= 0:
        return
    if min(_threads, n) == 1 or getattr(_local, "busy", False):
        fn(0, 0, n)
        return
    with single_threaded_blas():
        for_batch_blocks(fn, n, item_work)


def for_batch_chunks(fn: Callable[[int, int], None], n: int, item_work: int) -> None:
    """Call ``fn(start, stop)`` on one contiguous range of ``range(n)`` per thread (see
    ``for_batch_blocks``)."""
    for_batch_blocks(lambda _worker, start, stop: fn(start, stop), n, item_work)


if _RELOAD_BLAS_TIMEOUT:
    _reload_openblas_timeout()
set_num_threads(None)
