"""Background reading for the data layers: the next batch is read while the net computes.

A data layer hands ``Prefetcher.start`` the *key* of the batch it will need next (its read
position) and a function that reads it; at the next forward it asks ``take(key)``. The function
runs on a background thread and draws no random numbers, so the layer's resumable state stays
what it was without prefetching: the position of the next batch the net gets. A key that no
longer matches (a ``set_state`` moved the position) drops the prefetched batch and the layer
reads synchronously, so a prefetched batch never leaks into a resumed run. Random draws
(shuffles, crop offsets, mirror coins) stay on the main thread in their order, so results are
bit-identical with prefetching on or off.

At most one read is in flight per layer, and the layer touches its reader only after ``take``
returned (or ``cancel``), never while the background read may use it. ``MOKA_PREFETCH=0`` (or
``set_enabled(False)``) turns prefetching off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Any

_enabled = os.environ.get("MOKA_PREFETCH", "1").strip() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether data layers read their next batch in the background."""
    return _enabled


def set_enabled(on: bool) -> bool:
    """Turn prefetching on or off for reads started from now on; returns the previous value."""
    global _enabled
    previous, _enabled = _enabled, bool(on)
    return previous


class _Job:
    def __init__(self, key: Hashable, fn: Callable[[], Any]) -> None:
        self.key, self.fn, self.pid = key, fn, os.getpid()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="moka-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # re-raised in the forward that asks for this batch
            self.error = exc


class Prefetcher:
    """One background read at a time, identified by a key."""

    def __init__(self) -> None:
        self._job: _Job | None = None

    def start(self, key: Hashable, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` in the background as the read for ``key`` (when prefetching is on)."""
        self.cancel()
        if _enabled:
            self._job = _Job(key, fn)

    def take(self, key: Hashable) -> tuple[bool, Any]:
        """``(True, result)`` of the read for ``key`` (waiting for it; its error is raised
        here); ``(False, None)`` when none was started for ``key``."""
        job, self._job = self._job, None
        if job is None:
            return False, None
        job.thread.join()
        if job.key != key or job.pid != os.getpid():  # moved, or a forked child without it
            return False, None
        if job.error is not None:
            raise job.error
        return True, job.result

    def cancel(self) -> None:
        """Wait for a read in flight and drop it (its errors too)."""
        job, self._job = self._job, None
        if job is not None:
            job.thread.join()

    @property
    def pending(self) -> bool:
        return self._job is not None
