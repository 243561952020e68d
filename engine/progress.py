"""A live progress line under the log, for ``engine train`` and ``engine test`` on a terminal.

``StatusStream`` wraps the terminal stream the log handler writes to: before each write it
erases the status line (carriage return + erase-line), writes the log text, and once the text
ends a line draws the status again, so log lines are never garbled and the status always sits
on the last line. ``TrainProgress`` (a solver's ``progress`` observer) and ``TestProgress`` fill
the status: iteration / total, iterations per second, ETA, smoothed loss, rate and (when the
train data's size is known) the epoch. When the output is not a terminal none of this is
installed and the output is the log lines alone.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

ERASE_LINE = "\r\x1b[K"  # back to column 0, erase to the end of the line


class StatusStream:
    """A text stream that keeps one status line below everything written through it."""

    def __init__(self, stream: TextIO, *, min_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.min_interval = min_interval
        self.clock = clock
        self.status = ""
        self._shown = False
        self._at_line_start = True
        self._last_draw = -float("inf")

    # -- the file interface the log handler uses ------------------------------------------------
    def write(self, text: str) -> int:
        if not text:
            return 0
        self._erase()
        self.stream.write(text)
        self._at_line_start = text.endswith("\n")
        self._draw()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return True

    # -- the status line -----------------------------------------------------------------------
    def set_status(self, text: str, force: bool = False) -> None:
        """Show ``text`` as the status (at most every ``min_interval`` seconds unless forced)."""
        self.status = text
        now = self.clock()
        if force or now - self._last_draw >= self.min_interval:
            self._erase()
            self._draw()
            self.stream.flush()

    def clear(self) -> None:
        """Erase the status line and stop drawing it."""
        self._erase()
        self.status = ""
        self.stream.flush()

    def _erase(self) -> None:
        if self._shown:
            self.stream.write(ERASE_LINE)
            self._shown = False

    def _draw(self) -> None:
        if self.status and self._at_line_start:
            width = shutil.get_terminal_size((80, 24)).columns
            self.stream.write(self.status[:max(width - 1, 10)])  # never wrap: \r must reach it
            self._shown = True
            self._last_draw = self.clock()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def status_line(what: str, done: int, total: int, per_s: float | None,
                fields: list[tuple[str, str]]) -> str:
    """``[train] 120/2000 6% | 41.2 it/s | ETA 45s | loss 0.312 | lr 0.01 | epoch 1.27``."""
    percent = f" {100 * done // total}%" if total > 0 else ""
    parts = [f"[{what}] {done}/{total}{percent}"]
    if per_s:
        parts.append(f"{per_s:.3g} it/s")
        if total > done:
            parts.append(f"ETA {_duration((total - done) / per_s)}")
    parts += [f"{name} {value}" for name, value in fields]
    return " | ".join(parts)


class _Rate:
    """Iterations per second since the first call."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.start: tuple[float, int] | None = None

    def __call__(self, done: int) -> float | None:
        now = self.clock()
        if self.start is None:
            self.start = (now, done)
            return None
        elapsed, count = now - self.start[0], done - self.start[1]
        return count / elapsed if elapsed > 0 and count > 0 else None


def data_size(net) -> tuple[int, int] | None:
    """(records, batch size) of the net's first data layer whose size is known, else None."""
    for layer in net.layers:
        batch = getattr(layer, "batch_size", None)
        if not batch:
            continue
        size = getattr(getattr(layer, "reader", None), "size", None)  # Data: LMDB entries
        if size is None and getattr(layer, "lines", None) is not None:  # ImageData
            size = len(layer.lines)
        if size is None and getattr(layer, "data", None) is not None:  # MemoryData
            size = len(layer.data)
        if size:
            return int(size), int(batch)
    return None


class TrainProgress:
    """The solver's ``progress`` observer: ``update(solver)`` after every update."""

    def __init__(self, stream: StatusStream, solver) -> None:
        self.stream = stream
        self.rate = _Rate(stream.clock)
        self.data = data_size(solver.net)
        self.rate(solver.iter)

    def update(self, solver) -> None:
        p = solver.param
        fields = [("loss", f"{solver.smoothed_loss:.4g}"), ("lr", f"{solver.rate:.3g}")]
        if self.data:
            records, batch = self.data
            fields.append(("epoch", f"{solver.iter * batch * p.iter_size / records:.2f}"))
        line = status_line("train", solver.iter, p.max_iter, self.rate(solver.iter), fields)
        self.stream.set_status(line, force=solver.iter >= p.max_iter)


class TestProgress:
    """``engine test``'s status: ``update(done, loss)`` after every batch."""

    def __init__(self, stream: StatusStream, total: int) -> None:
        self.stream, self.total = stream, total
        self.rate = _Rate(stream.clock)
        self.rate(0)

    def update(self, done: int, loss: float) -> None:
        line = status_line("test", done, self.total, self.rate(done),
                           [("mean loss", f"{loss / done:.4g}")])
        self.stream.set_status(line, force=done >= self.total)
