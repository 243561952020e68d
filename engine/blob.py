"""Blob: the n-d array pair (data, diff) that flows between layers and holds parameters."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

MAX_AXES = 32  # Caffe's kMaxBlobAxes

_SHAPE_ONLY = contextvars.ContextVar("moka_blob_shape_only", default=False)


@contextlib.contextmanager
def shape_only() -> Iterator[None]:
    """Blobs reshaped inside this block record their shape but hold no memory.

    Their ``data`` and ``diff`` are zero-stride views of one element each, so a net built inside
    (``engine summary``) has every top and parameter shape without allocating activations;
    fillers do nothing. Values written to such a blob are meaningless. Not for running a net.
    """
    token = _SHAPE_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPE_ONLY.reset(token)


def shape_only_active() -> bool:
    """Whether blobs are being built by :func:`shape_only` (fillers skip their work then)."""
    return _SHAPE_ONLY.get()


class MemoryBudget:
    """A byte budget that blobs charge before they allocate (see :func:`memory_budget`).

    ``limit`` None means no limit. ``used`` counts the bytes of the buffers allocated while the
    budget was in force: data, and as much again for the diff when ``with_diff`` (a net that can
    run backward; diffs are allocated on first use). A reshape that would pass ``limit`` raises
    :class:`~engine.errors.ResourceError` before anything is allocated.
    """

    def __init__(self, limit: int | None, with_diff: bool = True) -> None:
        self.limit = limit
        self.used = 0
        self.with_diff = with_diff

    def charge(self, data_bytes: int, shape: tuple[int, ...]) -> None:
        nbytes = 2 * data_bytes if self.with_diff else data_bytes
        if self.limit is not None and self.used + nbytes > self.limit:
            from engine.errors import ResourceError

            what = "data and diff" if self.with_diff else "data"
            raise ResourceError(
                f"a blob of shape {shape} needs {format_bytes(nbytes)} ({what}); with "
                f"the {format_bytes(self.used)} already set up that passes the memory limit of "
                f"{format_bytes(self.limit)} (set it with --memory-limit or "
                "engine.set_memory_limit)", shape=shape, nbytes=nbytes)
        self.used += nbytes


_BUDGET: contextvars.ContextVar[MemoryBudget | None] = contextvars.ContextVar(
    "moka_blob_budget", default=None)


@contextlib.contextmanager
def memory_budget(budget: MemoryBudget | None) -> Iterator[MemoryBudget | None]:
    """Blobs that grow inside this block charge ``budget`` first (a Net's set-up and passes)."""
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def format_bytes(n: int) -> str:
    """``1536`` → ``'1.5 KiB'``: byte counts for messages."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _as_shape(dims: Sequence[int] | Iterable[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if len(shape) > MAX_AXES:
        raise ValueError(f"a blob has at most {MAX_AXES} axes; got {len(shape)}: {shape}")
    if any(d < 0 for d in shape):
        raise ValueError(f"blob dimensions must be non-negative; got {shape}")
    return shape


class Blob:
    """``data`` and ``diff``: two ndarrays of one shape.

    As in Caffe, the capacity only grows: reshaping to a smaller count keeps the allocation, so
    views handed out earlier (``net.blobs[name].data``) stay valid across batch-size changes that
    fit. Layers write into ``data[...]`` / ``diff[...]`` rather than rebinding them.
    """

    def __init__(self, shape: Sequence[int] = (), dtype: np.dtype | type = np.float32) -> None:
        self.dtype = np.dtype(dtype)
        self._data_buf = np.zeros(0, self.dtype)
        self._diff_buf: np.ndarray | None = None  # allocated when ``diff`` is first used
        self._diff: np.ndarray | None = None
        self._diff_of: Blob | None = None  # a blob whose diff this one's is a view of
        self.data = self._data_buf.reshape(0)
        self.reshape(shape)

    # -- diff, allocated lazily --------------------------------------------------------------
    @property
    def diff(self) -> np.ndarray:
        """The gradient array, allocated (zeros) on first use: a net that runs no backward
        never creates one (engine/memory.py)."""
        diff = self._diff
        if diff is None:
            shape = self.data.shape
            if self._diff_of is not None:
                diff = self._diff_of.diff.reshape(shape)
            else:
                count = self.data.size
                if self._diff_buf is None or self._diff_buf.size < count:
                    self._diff_buf = np.zeros(max(count, self._data_buf.size), self.dtype)
                diff = self._diff_buf[:count].reshape(shape)
            self._diff = diff
        return diff

    @diff.setter
    def diff(self, value: np.ndarray) -> None:
        self._diff = value
        self._diff_of = None

    @property
    def has_diff(self) -> bool:
        """Whether a diff array exists (was used, set or shared), without creating one."""
        return self._diff is not None or self._diff_buf is not None

    def view_diff_of(self, other: Blob) -> None:
        """Make ``diff`` a view of ``other``'s (reshaped to this blob's shape), created only
        when either is first used (Caffe's ShareDiff, lazily)."""
        if other._diff is None and other._diff_of is None and other is not self:
            self._diff = None
            self._diff_of = other
        else:
            self.diff = other.diff.reshape(self.shape)

    # -- shape -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def count(self) -> int:
        return int(self.data.size)

    @property
    def num_axes(self) -> int:
        return self.data.ndim

    def count_axes(self, start: int = 0, end: int | None = None) -> int:
        """Product of dims ``start <= axis < end`` (Caffe's ``count(start, end)``)."""
        return int(np.prod(self.shape[start:end], dtype=np.int64))

    def canonical_axis(self, axis: int) -> int:
        n = self.num_axes
        if not -n <= axis < max(n, 1):
            raise ValueError(f"axis {axis} is out of range for a {n}-d blob of shape {self.shape}")
        return axis % n if n else 0

    def reshape(self, *dims: int | Sequence[int]) -> None:
        """Reshape to ``dims`` (``blob.reshape(2, 3)`` or ``blob.reshape((2, 3))``)."""
        if len(dims) == 1 and not isinstance(dims[0], int | np.integer):
            dims = tuple(dims[0])  # type: ignore[arg-type]
        shape = _as_shape(dims)  # type: ignore[arg-type]
        if _SHAPE_ONLY.get():
            self._data_buf = np.zeros(1, self.dtype)
            self._diff_buf = np.zeros(1, self.dtype)
            strides = (0,) * len(shape)
            self.data = as_strided(self._data_buf, shape, strides, writeable=True)
            self.diff = as_strided(self._diff_buf, shape, strides, writeable=True)
            return
        if shape == self.data.shape and self.data.base is self._data_buf:
            return
        count = math.prod(shape)  # Python ints: no int64 overflow for absurd dims
        if count > self._data_buf.size:
            budget = _BUDGET.get()
            if budget is not None:
                budget.charge((count - self._data_buf.size) * self.dtype.itemsize, shape)
            self._data_buf = np.zeros(count, self.dtype)
            self._diff_buf = None
        self.data = self._data_buf[:count].reshape(shape)
        self._diff = None  # re-viewed (or allocated) on next use, in the new shape
        self._diff_of = None

    def reshape_like(self, other: Blob) -> None:
        self.reshape(other.shape)

    # legacy 4-d accessors (pycaffe's num/channels/height/width)
    @property
    def num(self) -> int:
        return self.shape[0] if self.num_axes > 0 else 1

    @property
    def channels(self) -> int:
        return self.shape[1] if self.num_axes > 1 else 1

    @property
    def height(self) -> int:
        return self.shape[2] if self.num_axes > 2 else 1

    @property
    def width(self) -> int:
        return self.shape[3] if self.num_axes > 3 else 1

    # -- sharing -----------------------------------------------------------------------------
    def share_data(self, other: Blob) -> None:
        """Make ``data`` a view of ``other.data`` (same count; shape kept)."""
        self._check_same_count(other)
        self.data = other.data.reshape(self.shape)

    def share_diff(self, other: Blob) -> None:
        self._check_same_count(other)
        self.view_diff_of(other)

    def share(self, other: Blob) -> None:
        """Share both arrays with ``other`` and take its shape (shared parameters)."""
        self.data = other.data
        self._data_buf = other._data_buf
        self._diff_buf = None
        self.view_diff_of(other)

    def _check_same_count(self, other: Blob) -> None:
        if self.count != other.count:
            raise ValueError(
                f"cannot share: counts differ ({self.shape} has {self.count}, "
                f"{other.shape} has {other.count})"
            )

    # -- protobuf ----------------------------------------------------------------------------
    def to_proto(self, write_diff: bool = False):  # -> caffe_pb2.BlobProto
        """A BlobProto with ``shape`` and the data (and diff); float64 goes to double_data."""
        from engine import caffe_pb2
        from engine.io import fill_blob_proto

        proto = caffe_pb2.BlobProto()
        if self.shape:  # a scalar (PReLU channel_shared) has no shape field, as Caffe writes it
            proto.shape.dim.extend(self.shape)
        fill_blob_proto(proto, self.data)
        if write_diff:
            fill_blob_proto(proto, self.diff, diff=True)
        return proto

    @classmethod
    def from_proto(cls, proto, dtype: np.dtype | type = np.float32) -> Blob:
        blob = cls(blob_proto_shape(proto), dtype)
        blob.data[...] = blob_proto_array(proto, blob.shape)
        if len(proto.diff) or len(proto.double_diff):
            blob.diff[...] = blob_proto_array(proto, blob.shape, diff=True)
        return blob

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape}, dtype={self.dtype.name})"


def _has_legacy_shape(proto) -> bool:
    return any(proto.HasField(f) for f in ("num", "channels", "height", "width"))


def blob_proto_shape(proto) -> tuple[int, ...]:
    """The shape a BlobProto declares: ``shape.dim`` or the legacy num/channels/height/width.

    With neither, Caffe reads no dims: a scalar, which is how it writes a 0-axis parameter
    (PReLU ``channel_shared``, Scale/Bias ``num_axes: 0``). A dim-less proto holding several
    values is taken as a vector of them.
    """
    if proto.HasField("shape"):
        return _as_shape(proto.shape.dim)
    if _has_legacy_shape(proto):
        return (proto.num, proto.channels, proto.height, proto.width)
    values = len(proto.data) or len(proto.double_data)
    return () if values == 1 else (values,)


def legacy_shape_matches(proto, shape: Sequence[int]) -> bool:
    """Caffe's ``Blob::ShapeEquals``: legacy 4-d dims align to the *end* of ``shape``.

    An old InnerProduct weight is stored as 1x1xMxK and an old bias as 1x1x1xN.
    """
    if not _has_legacy_shape(proto):
        return blob_proto_shape(proto) == tuple(shape)
    if len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    return padded == (proto.num, proto.channels, proto.height, proto.width)


def blob_proto_array(proto, shape: Sequence[int], diff: bool = False) -> np.ndarray:
    """The values of a BlobProto as an array of ``shape`` (float64 if stored as double)."""
    doubles = proto.double_diff if diff else proto.double_data
    floats = proto.diff if diff else proto.data
    values = np.asarray(doubles, np.float64) if len(doubles) else np.asarray(floats, np.float32)
    expected = int(np.prod(shape, dtype=np.int64))
    if values.size != expected:
        kind = "diff" if diff else "data"
        raise ValueError(
            f"BlobProto holds {values.size} {kind} values but its shape {tuple(shape)} needs "
            f"{expected}; the file is truncated or corrupt"
        )
    return values.reshape(shape)
