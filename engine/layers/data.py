"""Data layers: they have no bottoms and no gradient, and fill their tops from outside the net.

Types and their messages: ``Input`` (input_param), ``DummyData`` (dummy_data_param), ``Data``
(data_param + transform_param), ``HDF5Data`` (hdf5_data_param), ``MemoryData``
(memory_data_param + transform_param). Data and HDF5Data expose ``get_state()`` /
``set_state(state)``: their read position, which with the layer's ``rng`` is all an exact resume
needs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from engine import caffe_pb2
from engine.blob import Blob
from engine.data.datum import datum_to_array, parse_datum
from engine.data.db import open_db
from engine.data.hdf5 import HDF5Source, read_file_list
from engine.data.prefetch import Prefetcher
from engine.data.transformer import DataTransformer
from engine.errors import DataError, NetError
from engine.fillers import check_filler, fill
from engine.layer import Layer, register_layer

log = logging.getLogger(__name__)


class DataLayer(Layer):
    """No bottoms; ``backward`` does nothing."""

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (0, 0)
    # a record stream MPI ranks can split (engine.distributed): rank r of K keeps the records
    # i with i % K == r, while the read position stays the global one
    shareable = False
    rank, ranks = 0, 1

    def share(self, rank: int, ranks: int) -> None:
        """Serve this rank's share of every batch_size * ranks records read."""
        self.rank, self.ranks = rank, ranks

    @property
    def where(self) -> str:
        return f"layer '{self.name}' ({self.type})"

    def _batch_size(self, value: int) -> int:
        if value <= 0:
            raise self.error(f"batch_size must be positive; got {value}")
        return int(value)


def _dims(shape_proto, layer: Layer) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape_proto.dim)
    if any(d < 0 for d in dims):
        raise layer.error(f"shape dimensions must be non-negative; got {dims}")
    return dims


@register_layer
class Input(DataLayer):
    """The deploy-time input: tops of the given shapes whose data the user writes.

    ``input_param.shape`` once per top, once for all tops, or not at all. As in Caffe the tops are
    sized at setup and ``reshape`` leaves them alone, so ``net.blobs['data'].reshape(...)``
    followed by ``net.reshape()`` keeps the user's shape.
    """

    n_top = (1, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        shapes = [_dims(s, self) for s in self.param.input_param.shape]
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"give input_param.shape once, once per top ({len(top)}), or not "
                             f"at all; got {len(shapes)} shapes")
        for i, blob in enumerate(top):
            if shapes:
                blob.reshape(shapes[0 if len(shapes) == 1 else i])

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass


@register_layer
class DummyData(DataLayer):
    """Tops of fixed shapes filled by ``data_filler`` (0, 1 or one per top; default constant 0).

    Shapes: ``shape`` once or once per top, or the legacy ``num/channels/height/width`` lists
    (each once or once per top). As in Caffe, tops with a constant filler are filled once at
    setup; the others are refilled from ``rng`` at every forward (and not at setup).
    """

    n_top = (1, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.dummy_data_param
        n = len(top)
        if len(p.data_filler) not in (0, 1, n):
            raise self.error(f"give 0, 1 or {n} (one per top) data_filler; got "
                             f"{len(p.data_filler)}")
        self.shapes = self._shapes(p, n)
        fillers = list(p.data_filler) or [caffe_pb2.FillerParameter(type="constant", value=0)]
        self.fillers = [fillers[0 if len(fillers) == 1 else i] for i in range(n)]
        self.refill = [f.type != "constant" for f in self.fillers]
        for i, filler in enumerate(self.fillers):  # refilled ones run first at forward: check now
            try:
                check_filler(filler)
            except NetError as exc:
                raise self.error(f"data_filler {i}: {exc}") from None
        for i, blob in enumerate(top):
            blob.reshape(self.shapes[i])
            if not self.refill[i]:
                self._fill(i, blob)

    def _shapes(self, p, n: int) -> list[tuple[int, ...]]:
        legacy = {name: list(getattr(p, name)) for name in ("num", "channels", "height", "width")}
        if not any(legacy.values()):
            if len(p.shape) not in (1, n):
                raise self.error(f"give shape once or once per top ({n}); got {len(p.shape)}")
            return [_dims(p.shape[0 if len(p.shape) == 1 else i], self) for i in range(n)]
        if len(p.shape):
            raise self.error("give either shape or the legacy num/channels/height/width, "
                             "not both")
        for name, values in legacy.items():
            if len(values) not in (1, n):
                raise self.error(f"give {name} once or once per top ({n}); got {len(values)}")
        return [tuple(v[0 if len(v) == 1 else i] for v in legacy.values()) for i in range(n)]

    def _fill(self, i: int, blob: Blob) -> None:
        blob.data[...] = fill(blob.shape, self.fillers[i], self.rng)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        for i, blob in enumerate(top):
            if self.refill[i]:
                self._fill(i, blob)


def _transform_param(param) -> caffe_pb2.TransformationParameter:
    """transform_param, completed by the legacy data_param fields an old net may still carry."""
    merged = caffe_pb2.TransformationParameter()
    merged.CopyFrom(param.transform_param)
    for field in ("scale", "mean_file", "crop_size", "mirror"):
        if param.data_param.HasField(field) and not merged.HasField(field):
            setattr(merged, field, getattr(param.data_param, field))
    return merged


@register_layer
class Data(DataLayer):
    """Datum records from an LMDB, in key order, wrapping at the end; transform_param applied.

    Tops: data (batch_size, C, H, W), or (batch_size, C, crop, crop); optional label
    (batch_size,). Like Caffe, each batch takes its shape from its first record (records of a
    batch must match it unless cropping), and ``rand_skip`` skips a random number of records in
    [0, rand_skip) at setup. State: ``{"cursor": index of the next record}``.
    """

    n_top = (1, 2)
    shareable = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.data_param
        self.batch_size = self._batch_size(p.batch_size)
        self.transformer = DataTransformer(_transform_param(self.param), self.phase,
                                           f"{self.where}, source '{p.source}'")
        self.reader = open_db(p.source, p.backend, self.where)
        if p.rand_skip:
            skip = int(self.rng.integers(0, p.rand_skip))
            log.info("%s: skipping first %d data points", self.where, skip)
            self.reader.skip(skip)
        self._warned_force = False
        first, _ = self._decode(*self.reader.peek())
        self.top_shape = (self.batch_size, *self.transformer.infer_shape(first.shape))
        self.cursor = self.reader.position  # the next batch the net gets starts here
        self.prefetch = Prefetcher()

    def _decode(self, key: bytes, value: bytes) -> tuple[np.ndarray, int]:
        where = f"{self.where}: record {key!r} of '{self.reader.path}'"
        datum = parse_datum(value, where)
        if not datum.encoded and self.transformer.color is not None and not self._warned_force:
            log.warning("%s: force_color / force_gray only apply to encoded records; ignored",
                        self.where)
            self._warned_force = True
        return datum_to_array(datum, self.transformer.color, where), datum.label

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape(self.top_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))

    def _read_batch(self) -> tuple[list[np.ndarray] | np.ndarray, list[int]]:
        """The next batch from the reader: decoded images (transformed already, as a float
        array, when the transform is not random) and labels. Runs in the background."""
        records = self.reader.read(self.batch_size * self.ranks)[self.rank::self.ranks]
        decoded = [self._decode(key, value) for key, value in records]
        images = [image for image, _ in decoded]
        labels = [label for _, label in decoded]
        if self.transformer.random:
            return images, labels
        shape = (self.batch_size, *self.transformer.infer_shape(images[0].shape))
        out = np.empty(shape, self.dtype)
        self.transformer.transform(images, out, None)
        return out, labels

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        hit, batch = self.prefetch.take(self.cursor)
        if not hit:
            if self.reader.position != self.cursor:
                self.reader.seek(self.cursor)
            batch = self._read_batch()
        images, labels = batch
        self.cursor = self.reader.position
        self.prefetch.start(self.cursor, self._read_batch)
        if isinstance(images, np.ndarray):  # transformed in the background
            self.top_shape = images.shape
            self.reshape(bottom, top)
            top[0].data[...] = images
        else:
            self.top_shape = (self.batch_size, *self.transformer.infer_shape(images[0].shape))
            self.reshape(bottom, top)
            self.transformer.transform(images, top[0].data, self.rng)
        if len(top) > 1:
            top[1].data[...] = labels

    def get_state(self) -> dict:
        return {"cursor": self.cursor}

    def set_state(self, state: dict) -> None:
        self.prefetch.cancel()
        self.reader.seek(int(state["cursor"]))
        self.cursor = self.reader.position


@register_layer
class HDF5Data(DataLayer):
    """Rows of HDF5 datasets named after the tops; ``source`` is a text file listing .h5 files.

    Each top is (batch_size, *row shape) for a dataset of shape (rows, *row shape); batches cross
    file boundaries and wrap. ``shuffle``: file order reshuffled every epoch, rows each time a
    file is entered (from ``rng``). No transform_param, as in Caffe. State: file order, file,
    row cursor, row order and epoch.

    The next batch's rows are gathered on a background thread while the net computes when they
    lie in the loaded file (engine/data/prefetch.py); a batch that enters the next file is read
    in the forward, where the shuffles are drawn.
    """

    n_top = (1, None)
    shareable = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data; remove transform_param and "
                             "store the data preprocessed")
        p = self.param.hdf5_data_param
        self.batch_size = self._batch_size(p.batch_size)
        names = list(self.param.top)
        if len(names) != len(top):
            raise self.error(f"every top needs a name (the dataset to read); got names {names} "
                             f"for {len(top)} tops")
        files = read_file_list(p.source, self.where)
        self.source = HDF5Source(files, names, self.dtype, p.shuffle, self.where)
        self.source.start(self.rng)
        self.prefetch = Prefetcher()

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        for blob, row_shape in zip(top, self.source.row_shapes, strict=True):
            blob.reshape((self.batch_size, *row_shape))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        n = self.batch_size * self.ranks  # every MPI rank's rows; this one keeps i % ranks
        hit, rows = self.prefetch.take(self.source.position())
        if hit and rows is not None:
            self.source.advance(n, self.rng)
        elif self.ranks == 1:
            rows = [blob.data for blob in top]
            self.source.read(n, rows, self.rng)
        else:
            rows = [np.empty((n, *blob.shape[1:]), blob.data.dtype) for blob in top]
            self.source.read(n, rows, self.rng)
        for blob, values in zip(top, rows, strict=True):
            if values is not blob.data:
                blob.data[...] = values[self.rank::self.ranks]
        self.prefetch.start(self.source.position(), lambda: self.source.rows_ahead(n))

    def get_state(self) -> dict:
        return self.source.get_state()

    def set_state(self, state: dict) -> None:
        self.prefetch.cancel()
        self.source.set_state(state)


@register_layer
class MemoryData(DataLayer):
    """Batches from arrays held in memory: data (batch_size, C, H, W) and label (batch_size,).

    ``reset(data, labels)`` (pycaffe's ``set_input_arrays``) serves the arrays as given: like
    Caffe's Reset it does *not* apply transform_param (it warns when one is set).
    ``add_datum_vector`` / ``add_mat_vector`` transform first, as Caffe's AddDatumVector and
    AddMatVector. Each forward serves the next batch_size rows, wrapping. State: the cursor.
    """

    n_top = (2, 2)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.memory_data_param
        self.batch_size = int(p.batch_size)
        self.image_shape = (int(p.channels), int(p.height), int(p.width))
        if self.batch_size * int(np.prod(self.image_shape)) <= 0:
            raise self.error(f"batch_size, channels, height and width must all be positive in "
                             f"memory_data_param; got {self.batch_size}, {self.image_shape}")
        self.transformer = DataTransformer(self.param.transform_param, self.phase, self.where)
        self.warn_no_transform = self.param.HasField("transform_param")
        self.data: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.pos = 0

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape((self.batch_size, *self.image_shape))
        top[1].reshape((self.batch_size,))

    def reset(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Serve ``data`` (N, C, H, W) and ``labels`` (N,) from the start; N % batch_size == 0."""
        data = np.asarray(data)
        labels = np.asarray(labels)
        if data.ndim != 4 or data.shape[1:] != self.image_shape:
            raise self.error(f"data must be (N, {', '.join(map(str, self.image_shape))}) as "
                             f"memory_data_param says; got shape {data.shape}")
        if labels.size != len(data) or (labels.ndim > 1 and labels.shape[0] != len(data)):
            raise self.error(f"labels must hold one value per data row ({len(data)}); got "
                             f"shape {labels.shape}")
        if len(data) == 0 or len(data) % self.batch_size:
            raise self.error(f"the number of rows ({len(data)}) must be a positive multiple of "
                             f"batch_size {self.batch_size}")
        if self.warn_no_transform:
            log.warning("%s does not transform array data on reset()", self.where)
        self.data = np.ascontiguousarray(data, dtype=self.dtype)
        self.labels = np.ascontiguousarray(labels.reshape(-1), dtype=self.dtype)
        self.pos = 0

    set_input_arrays = reset

    def add_datum_vector(self, datums: Sequence) -> None:
        """Transform Datum messages (transform_param) and serve them with their labels."""
        images = [datum_to_array(d, self.transformer.color, self.where) for d in datums]
        self._add_transformed(images, [d.label for d in datums])

    def add_mat_vector(self, images: Sequence[np.ndarray], labels: Sequence[int]) -> None:
        """Transform HxWxC (BGR, as OpenCV's cv::Mat) or HxW images and serve them."""
        chw = [np.asarray(m).reshape(*np.shape(m)[:2], -1).transpose(2, 0, 1) for m in images]
        self._add_transformed(chw, labels)

    def _add_transformed(self, images: list[np.ndarray], labels: Sequence[int]) -> None:
        if not images or len(images) % self.batch_size or len(labels) != len(images):
            raise self.error(f"add a positive multiple of batch_size {self.batch_size} images "
                             f"with one label each; got {len(images)} images, "
                             f"{len(labels)} labels")
        out = np.empty((len(images), *self.image_shape), self.dtype)
        self.transformer.transform(images, out, self.rng)
        self.data, self.labels, self.pos = out, np.asarray(labels, self.dtype), 0

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        if self.data is None or self.labels is None:
            raise DataError(f"{self.where}: no data yet; call reset(data, labels) "
                            f"(net.set_input_arrays) before forward")
        rows = slice(self.pos, self.pos + self.batch_size)
        top[0].data[...] = self.data[rows]
        top[1].data[...] = self.labels[rows]
        self.pos = (self.pos + self.batch_size) % len(self.data)

    def get_state(self) -> dict:
        return {"cursor": self.pos}

    def set_state(self, state: dict) -> None:
        self.pos = int(state["cursor"])
