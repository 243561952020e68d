"""HDF5 sources for the HDF5Data layer: a list file of .h5 paths, read row by row.

As in Caffe's HDF5DataLayer, each file is loaded whole; its datasets are named after the layer's
tops and share the first (row) axis. With ``shuffle`` the file order is reshuffled at every
epoch and the rows of a file each time it is entered.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from engine.data.listfile import list_lines
from engine.errors import DataError

if TYPE_CHECKING:
    import h5py

log = logging.getLogger(__name__)


def read_file_list(source: str, where: str = "HDF5Data") -> list[str]:
    """The .h5 paths a list file names, one per line.

    A relative path is taken from the working directory, as Caffe does; if no file is there, from
    the list file's folder.
    """
    paths = []
    for _, line in list_lines(source, where, "HDF5 list file", "path/to/file.h5"):
        line = line.strip()
        beside = os.path.join(os.path.dirname(source), line)
        if os.path.isfile(line) or os.path.isabs(line) or not os.path.isfile(beside):
            paths.append(line)
        else:
            paths.append(beside)
    if not paths:
        raise DataError(f"{where}: the HDF5 list file '{source}' names no files; list one .h5 "
                        f"path per line")
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{where}: HDF5 file '{path}' (listed in '{source}') does not exist; "
                            f"relative paths are tried from the working directory and from the "
                            f"list file's folder")
    return paths


def load_hdf5(path: str, names: list[str], dtype: np.dtype, where: str = "HDF5Data"
              ) -> list[np.ndarray]:
    """The datasets ``names`` of one file as arrays of ``dtype`` with a common row count."""
    import h5py  # here, not at import: h5py adds ~13 MB to every process that reads no HDF5

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{where}: cannot open HDF5 file '{path}': {exc}") from exc
    try:
        with f:
            arrays = [_load_dataset(f, path, name, dtype, where) for name in names]
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:  # h5py on bad bytes
        raise DataError(f"{where}: cannot read HDF5 file '{path}' (truncated or corrupt?): "
                        f"{type(exc).__name__}: {exc}") from exc
    rows = {name: len(a) for name, a in zip(names, arrays, strict=True)}
    if len(set(rows.values())) != 1:
        raise DataError(f"{where}: the datasets of '{path}' have different row counts {rows}; "
                        f"every top needs one row per example")
    if arrays[0].shape[0] == 0:
        raise DataError(f"{where}: the datasets of HDF5 file '{path}' have no rows")
    return arrays


def _load_dataset(f: h5py.File, path: str, name: str, dtype: np.dtype, where: str) -> np.ndarray:
    import h5py

    dataset = f.get(name)
    if not isinstance(dataset, h5py.Dataset):
        found = ", ".join(sorted(f.keys())) or "none"
        raise DataError(f"{where}: HDF5 file '{path}' has no dataset '{name}' (found: {found}); "
                        f"datasets must be named after the layer's tops")
    if dataset.ndim < 1 or dataset.dtype.kind not in "fiub":
        raise DataError(f"{where}: dataset '{name}' in '{path}' is {dataset.dtype} of shape "
                        f"{dataset.shape}; it must be numeric with at least one axis (rows)")
    return np.asarray(dataset[()], dtype=dtype)


class HDF5Source:
    """Serves rows from a list of HDF5 files in order, crossing file boundaries and wrapping.

    State: ``file_order`` (a permutation of the files), ``file`` (position in it), ``row``
    (position in ``order``, the row permutation of the loaded file) and ``epoch``.
    """

    def __init__(self, files: list[str], names: list[str], dtype: np.dtype, shuffle: bool,
                 where: str = "HDF5Data") -> None:
        self.files, self.names, self.dtype = files, names, np.dtype(dtype)
        self.shuffle, self.where = shuffle, where
        self.file_order = np.arange(len(files))
        self.file = self.row = self.epoch = 0
        self.arrays: list[np.ndarray] = []
        self.order = np.zeros(0, np.int64)
        self.row_shapes: list[tuple[int, ...]] = []
        self._loaded: str | None = None

    def start(self, rng: np.random.Generator) -> None:
        if self.shuffle:
            self.file_order = rng.permutation(len(self.files))
        self._enter_file(rng)

    def read(self, n: int, outs: list[np.ndarray], rng: np.random.Generator) -> None:
        """Fill the first ``n`` rows of each array in ``outs`` with the next rows."""
        done = 0
        while done < n:
            take = min(n - done, len(self.order) - self.row)
            if self.shuffle:
                rows = self.order[self.row:self.row + take]
            else:
                rows = slice(self.row, self.row + take)
            for out, array in zip(outs, self.arrays, strict=True):
                out[done:done + take] = array[rows]
            done += take
            self.row += take
            if self.row == len(self.order):
                self._next_file(rng)

    def position(self) -> tuple[int, int, int]:
        """(file, row, epoch): where the next row comes from."""
        return self.file, self.row, self.epoch

    def rows_ahead(self, n: int) -> list[np.ndarray] | None:
        """The next ``n`` rows of every dataset when they all lie in the loaded file (the rows
        after it depend on draws made when the next file is entered), else None: gathered
        copies when shuffling, else views of the loaded arrays (never written, only replaced).
        Moves nothing; safe on another thread while the source is left alone."""
        if self.row + n > len(self.order):
            return None
        rows = self.order[self.row:self.row + n] if self.shuffle else slice(self.row,
                                                                             self.row + n)
        return [array[rows] for array in self.arrays]

    def advance(self, n: int, rng: np.random.Generator) -> None:
        """Move past ``n`` rows that ``rows_ahead(n)`` returned."""
        self.row += n
        if self.row == len(self.order):
            self._next_file(rng)

    def _next_file(self, rng: np.random.Generator) -> None:
        self.row = 0
        if len(self.files) == 1:
            self.epoch += 1
            if self.shuffle:
                self.order = rng.permutation(len(self.order))
            return
        self.file += 1
        if self.file == len(self.files):
            self.file = 0
            self.epoch += 1
            log.debug("%s: looping around to the first HDF5 file", self.where)
            if self.shuffle:
                self.file_order = rng.permutation(len(self.files))
        self._enter_file(rng)

    def _enter_file(self, rng: np.random.Generator | None) -> None:
        path = self.files[self.file_order[self.file]]
        if path != self._loaded:
            self.arrays = load_hdf5(path, self.names, self.dtype, self.where)
            shapes = [a.shape[1:] for a in self.arrays]
            if self.row_shapes and shapes != self.row_shapes:
                raise DataError(f"{self.where}: HDF5 file '{path}' has rows of shapes {shapes} "
                                f"but '{self._loaded}' had {self.row_shapes}; every file must "
                                f"have the same per-row shapes")
            self.row_shapes, self._loaded = shapes, path
        rows = len(self.arrays[0])
        self.order = rng.permutation(rows) if self.shuffle and rng is not None \
            else np.arange(rows)

    def get_state(self) -> dict:
        return {"file": self.file, "cursor": self.row, "epoch": self.epoch,
                "file_order": [int(i) for i in self.file_order],
                "order": [int(i) for i in self.order] if self.shuffle else []}

    def set_state(self, state: dict) -> None:
        file_order = np.asarray(state["file_order"], np.int64)
        if sorted(file_order.tolist()) != list(range(len(self.files))):
            raise DataError(f"{self.where}: the saved state's file order {file_order.tolist()} "
                            f"does not fit the {len(self.files)} listed files")
        self.file_order, self.file = file_order, int(state["file"])
        self._enter_file(None)
        if self.shuffle:
            order = np.asarray(state["order"], np.int64)
            if len(order) != len(self.order):
                raise DataError(f"{self.where}: the saved row order has {len(order)} rows but "
                                f"the file has {len(self.order)}; the data changed since")
            self.order = order
        self.row, self.epoch = int(state["cursor"]), int(state["epoch"])
