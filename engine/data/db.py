"""Caffe's on-disk data: LMDB record stores and ``.binaryproto`` mean files.

Caffe's Data layer reads LMDB or LevelDB; only LMDB is available here. A LevelDB source has to be
converted (``engine convert-imageset --backend lmdb``, or Caffe's own tools).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterable

import lmdb
import numpy as np
from google.protobuf.message import DecodeError

from engine import caffe_pb2
from engine.blob import blob_proto_array, blob_proto_shape
from engine.errors import DataError

log = logging.getLogger(__name__)

try:  # py-lmdb's registry of open environments (see _open_read_only); older versions lack it
    from lmdb import _envid as _LMDB_ENVID
except ImportError:
    _LMDB_ENVID = None

LEVELDB, LMDB = 0, 1  # DataParameter.DB

# py-lmdb refuses to open one environment twice in a process, and a train and a test net often
# read the same DB: readers share one read-only environment per path while any is alive.
_ENVIRONMENTS: weakref.WeakValueDictionary[str, lmdb.Environment] = weakref.WeakValueDictionary()


def is_lmdb(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


def open_db(source: str, backend: int = LMDB, where: str = "Data") -> LMDBReader:
    """A reader for a Data layer's ``source``; a LevelDB that is really an LMDB is read as one."""
    if backend == LEVELDB and not is_lmdb(source):
        if not os.path.exists(source):
            raise DataError(f"{where}: data source '{source}' does not exist")
        raise DataError(f"{where}: '{source}' is not an LMDB and LEVELDB is not supported; "
                        f"convert it to LMDB (engine convert-imageset --backend lmdb) and set "
                        f"data_param {{ backend: LMDB }}")
    return LMDBReader(source, where)


class LMDBReader:
    """Reads an LMDB's values in key order, wrapping to the first record after the last.

    ``position`` is the index of the next record ``read`` returns: the whole resumable state.
    """

    def __init__(self, path: str, where: str = "Data") -> None:
        self.path = path
        self.where = where
        if not os.path.isdir(path):
            raise DataError(f"{where}: LMDB source '{path}' does not exist (expected a directory "
                            f"holding data.mdb)")
        if not is_lmdb(path):
            raise DataError(f"{where}: '{path}' is not an LMDB: it has no data.mdb")
        self._env = _open_env(path, where)
        self.size = int(self._env.stat()["entries"])
        if self.size == 0:
            raise DataError(f"{where}: LMDB '{path}' is empty; it holds no records")
        self._txn = self._env.begin(buffers=False)
        self._cursor = self._txn.cursor()
        self.position = 0
        self._cursor.first()

    def read(self, n: int) -> list[tuple[bytes, bytes]]:
        """The next ``n`` (key, value) pairs, logging Caffe's message at each wrap-around."""
        records = []
        for _ in range(n):
            records.append((self._cursor.key(), self._cursor.value()))
            self.position += 1
            if not self._cursor.next():
                log.info("%s: Restarting data prefetching from start.", self.where)
                self._cursor.first()
                self.position = 0
        return records

    def peek(self) -> tuple[bytes, bytes]:
        """The next record, without moving."""
        return self._cursor.key(), self._cursor.value()

    def seek(self, position: int) -> None:
        """Move to record ``position`` (taken modulo the record count)."""
        position = int(position) % self.size
        self._cursor.first()
        for _ in range(position):
            self._cursor.next()
        self.position = position

    def skip(self, n: int) -> None:
        self.seek(self.position + n)

    def close(self) -> None:
        self._txn.abort()


def _open_env(path: str, where: str) -> lmdb.Environment:
    key = os.path.realpath(path)
    env = _ENVIRONMENTS.get(key)
    if env is None:
        try:
            env = _open_read_only(path)
        except lmdb.Error as exc:
            hint = ""
            if "already open" in str(exc):
                hint = ("; this lmdb version allows one open per process: close your own "
                        "lmdb.Environment for it (env.close()) before building the net")
            raise DataError(f"{where}: cannot open LMDB '{path}': {exc}{hint}") from exc
        _ENVIRONMENTS[key] = env
    return env


_GUARD_LOCK = threading.Lock()


def _open_read_only(path: str) -> lmdb.Environment:
    """A read-only, lock-free environment that a user's own ``lmdb.open`` does not collide with.

    py-lmdb refuses to open an environment's files twice in one process, because LMDB's fcntl
    locks on ``lock.mdb`` belong to the process: closing one copy would drop the other's. With
    ``lock=False`` LMDB never opens ``lock.mdb`` nor takes a lock, so that hazard does not apply;
    the environment is opened without entering py-lmdb's registry of open files, so a script
    that opened the same LMDB itself (before or after) and a Data layer reading it both work.
    """
    envid = _LMDB_ENVID
    if envid is None or not callable(getattr(envid, "env_keys", None)):
        return lmdb.open(path, readonly=True, lock=False, max_readers=512)
    with _GUARD_LOCK:
        env_keys = envid.env_keys
        envid.env_keys = _no_keys
        try:
            return lmdb.open(path, readonly=True, lock=False, max_readers=512)
        finally:
            envid.env_keys = env_keys


def _no_keys(path, subdir) -> tuple:
    return ()


def write_lmdb(path: str, items: Iterable[tuple[bytes, bytes]], map_size: int = 1 << 26) -> int:
    """Write (key, value) pairs to a new or existing LMDB directory; returns the count written.

    The map starts at ``map_size`` bytes and doubles whenever it fills, so any size works.
    """
    if os.path.realpath(path) in _ENVIRONMENTS:
        raise DataError(f"LMDB '{path}' is open for reading in this process; close its readers "
                        f"before writing to it")
    env = lmdb.open(path, map_size=map_size, subdir=True)
    count = 0
    try:
        pending: list[tuple[bytes, bytes]] = []
        for key, value in items:
            pending.append((key, value))
            if len(pending) == 1000:
                count += put_all(env, pending)
                pending = []
        count += put_all(env, pending)
    finally:
        env.close()
    return count


def put_all(env: lmdb.Environment, pending: list[tuple[bytes, bytes]]) -> int:
    """Put the ``pending`` (key, value) pairs into ``env`` in one transaction; returns their count.

    When the map fills, the transaction is dropped, the map size doubled and the whole batch
    written again, so a caller never sizes the map itself.
    """
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in pending:
                    txn.put(key, value)
            return len(pending)
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def read_lmdb(path: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) pair of an LMDB, in key order (for tools and tests)."""
    reader = LMDBReader(path, where=f"LMDB '{path}'")
    try:
        return reader.read(reader.size)
    finally:
        reader.close()


# -- mean files ------------------------------------------------------------------------------
def read_blob_proto(path: str, what: str = "binary proto"):
    """Parse a BlobProto file; a missing or corrupt file is a DataError naming the path."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {what} '{path}': {exc.strerror}; check the path "
                        f"(relative paths start at the working directory)") from exc
    if not raw:
        raise DataError(f"{what} '{path}' is empty; regenerate it")
    try:
        return caffe_pb2.BlobProto.FromString(raw)
    except DecodeError as exc:
        raise DataError(f"{what} '{path}' is not a BlobProto ({exc}); the file is truncated or "
                        f"corrupt: regenerate it (engine compute-image-mean)") from exc


def read_mean(path: str) -> np.ndarray:
    """A mean ``.binaryproto`` as a float array of shape (C, H, W).

    compute_image_mean writes 1xCxHxW; the leading 1 is dropped.
    """
    proto = read_blob_proto(path, "mean file")
    shape = blob_proto_shape(proto)
    try:
        mean = blob_proto_array(proto, shape)
    except ValueError as exc:
        raise DataError(f"mean file '{path}': {exc}") from exc
    if len(shape) == 4 and shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise DataError(f"mean file '{path}' holds a blob of shape {shape}; a mean image is "
                        f"1xCxHxW (or CxHxW)")
    return mean


def write_mean(path: str, mean: np.ndarray) -> None:
    """Write a (C, H, W) or (1, C, H, W) mean as Caffe's compute_image_mean does (legacy dims)."""
    mean = np.asarray(mean, np.float32)
    if mean.ndim == 3:
        mean = mean[None]
    if mean.ndim != 4 or mean.shape[0] != 1:
        raise DataError(f"a mean image is (C, H, W) or (1, C, H, W); got shape {mean.shape}")
    proto = caffe_pb2.BlobProto()
    proto.num, proto.channels, proto.height, proto.width = mean.shape
    proto.data.extend(mean.ravel().tolist())
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
