"""Caffe's data tools, behind ``engine convert-imageset``, ``compute-image-mean`` and ``upgrade``.

- ``convert_imageset``: tools/convert_imageset.cpp, an image list → Datum records in an LMDB.
- ``compute_image_mean``: tools/compute_image_mean.cpp, the mean image of an LMDB of Datums.
- ``upgrade_proto_text``: tools/upgrade_net_proto_text.cpp and upgrade_solver_proto_text.cpp.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from engine import caffe_pb2
from engine.data.datum import array_to_datum, datum_to_array, parse_datum
from engine.data.db import LMDBReader, write_lmdb, write_mean
from engine.data.image import read_image
from engine.errors import DataError
from engine.layers.image_data import read_list_file, resize_linear

log = logging.getLogger(__name__)

ENCODE_TYPES = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
# Fields only a SolverParameter has at the top level of a prototxt.
_SOLVER_FIELD = re.compile(r"^\s*(net|net_param|train_net|train_net_param|test_net|base_lr|"
                           r"lr_policy|max_iter|solver_type|test_iter)\s*[:{]", re.MULTILINE)
_SNAPSHOT_PREFIX = re.compile(r"^\s*snapshot_prefix\s*:", re.MULTILINE)


# -- convert_imageset ------------------------------------------------------------------------
def convert_imageset(root: str, list_file: str, db: str, *, gray: bool = False,
                     shuffle: bool = False, resize_height: int = 0, resize_width: int = 0,
                     check_size: bool = False, encoded: bool = False, encode_type: str = "",
                     rng: np.random.Generator | None = None) -> int:
    """Write one Datum per ``path label`` line to the LMDB ``db``; returns the count written.

    Keys are ``%08d_<path>`` with the line's index (after shuffling). Raw Datums hold BGR (or
    gray) CHW bytes; ``encoded`` stores the file's own bytes when no conversion is needed (its
    channels match, no resize, its extension is the encoding) and re-encodes otherwise, as
    Caffe's ReadImageToDatum. As in Caffe a file that cannot be read is skipped with an error
    line; a list with no readable image at all is an error.
    """
    where = "convert-imageset"
    if (resize_height > 0) != (resize_width > 0) or resize_height < 0 or resize_width < 0:
        raise DataError(f"{where}: give --resize_height and --resize_width together (both "
                        f"positive) or neither; got {resize_height} and {resize_width}")
    if encode_type and encode_type.lower() not in ENCODE_TYPES:
        raise DataError(f"{where}: --encode_type must be one of png, jpg; got '{encode_type}'")
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
        encoded = True
    lines = read_list_file(list_file, where)
    if shuffle:
        log.info("Shuffling data")
        order = (rng or np.random.default_rng()).permutation(len(lines))
        lines = [lines[i] for i in order]
    log.info("A total of %d images.", len(lines))
    if os.path.exists(os.path.join(db, "data.mdb")):
        raise DataError(f"{where}: '{db}' already holds an LMDB; remove it or choose another "
                        f"output (Caffe refuses to overwrite one too)")
    options = (not gray, resize_height, resize_width, encoded, encode_type.lower())
    first_shape: list[tuple[int, ...]] = []

    def records():
        for index, (path, label) in enumerate(lines):
            datum = _image_datum(root + path, label, *options)
            if datum is None:
                continue
            if check_size:
                _check_size(datum, first_shape, root + path)
            yield f"{index:08d}_{path}".encode(), datum.SerializeToString()
            if (index + 1) % 1000 == 0:
                log.info("Processed %d files.", index + 1)

    count = write_lmdb(db, records())
    if count == 0:
        raise DataError(f"{where}: none of the {len(lines)} images listed in '{list_file}' "
                        f"could be read under root '{root}'")
    log.info("Processed %d files.", count)
    return count


def _image_datum(path: str, label: int, color: bool, height: int, width: int, encoded: bool,
                 encode_type: str):
    """Caffe's ReadImageToDatum; None (after logging) for a file that cannot be read."""
    try:
        image = read_image(path, color)
    except DataError as exc:
        log.error("Could not open or find file %s (%s)", path, exc)
        return None
    if height:
        image = resize_linear(image, height, width)
    if not encoded:
        return array_to_datum(image, label)
    ext = os.path.splitext(path)[1][1:].lower()
    if not encode_type:
        encode_type = ext
        if encode_type not in ENCODE_TYPES:
            log.warning("Failed to guess the encoding of '%s'; storing it as PNG", path)
            encode_type = "png"
    fmt = ENCODE_TYPES[encode_type]
    if not height and ENCODE_TYPES.get(ext) == fmt and _file_channels_match(path, color):
        with open(path, "rb") as f:
            return caffe_pb2.Datum(data=f.read(), label=label, encoded=True)
    datum = array_to_datum(image, label, encode=fmt)
    for field in ("channels", "height", "width"):
        datum.ClearField(field)  # Caffe's re-encoded Datums carry no sizes either
    return datum


def _file_channels_match(path: str, color: bool) -> bool:
    """Caffe stores the file as is only when decoding it natively gives the wanted channels."""
    return (read_image(path, None).shape[0] == 3) == color


def _check_size(datum, first: list[tuple[int, ...]], path: str) -> None:
    shape = datum_to_array(datum, None, path).shape
    if not first:
        first.append(shape)
    elif shape != first[0]:
        raise DataError(f"convert-imageset --check_size: '{path}' is "
                        f"{'x'.join(map(str, shape))} but the first image is "
                        f"{'x'.join(map(str, first[0]))}")


# -- compute_image_mean ----------------------------------------------------------------------
def compute_image_mean(db: str, out: str | None = None) -> np.ndarray:
    """The mean (C, H, W) of every Datum in the LMDB ``db``; written as a 1xCxHxW BlobProto to
    ``out`` when given. Logs each channel's mean as Caffe's tool does."""
    reader = LMDBReader(db, where=f"compute-image-mean '{db}'")
    try:
        total = None
        log.info("Starting iteration")
        for count, (key, value) in enumerate(reader.read(reader.size), 1):
            where = f"record {key!r} of '{db}'"
            image = datum_to_array(parse_datum(value, where), None, where)
            if total is None:
                total = np.zeros(image.shape, np.float64)
            elif image.shape != total.shape:
                raise DataError(f"compute-image-mean: {where} is "
                                f"{'x'.join(map(str, image.shape))} but the first record is "
                                f"{'x'.join(map(str, total.shape))}; all images need one size")
            total += image
            if count % 10000 == 0:
                log.info("Processed %d files.", count)
    finally:
        reader.close()
    assert total is not None  # LMDBReader refuses an empty DB
    log.info("Processed %d files.", reader.size)
    mean = total / reader.size
    if out:
        log.info("Write to %s", out)
        write_mean(out, mean)
    log.info("Number of channels: %d", mean.shape[0])
    for c, value in enumerate(mean.reshape(mean.shape[0], -1).mean(axis=1)):
        log.info("mean_value channel [%d]: %s", c, f"{value:g}")
    return mean.astype(np.float32)


# -- upgrade ---------------------------------------------------------------------------------
def is_solver_text(text: str) -> bool:
    """True when a prototxt sets a field only a SolverParameter has (net, base_lr, ...)."""
    return _SOLVER_FIELD.search(text) is not None


def upgrade_proto_text(src: str, dst: str) -> str:
    """Upgrade a legacy net (V0/V1) or solver prototxt to the current format; returns which
    ("net" or "solver") it was."""
    from engine.io import read_net_param, read_solver_param, write_text

    try:
        with open(src, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise DataError(f"upgrade: cannot read '{src}': {exc.strerror or exc}") from exc
    if is_solver_text(text):
        solver = read_solver_param(src)
        if _SNAPSHOT_PREFIX.search(text) is None:
            solver.ClearField("snapshot_prefix")  # keep the file's own default, as Caffe
        write_text(solver, dst)
        log.info("Wrote upgraded SolverParameter text proto to %s", dst)
        return "solver"
    write_text(read_net_param(src, is_text=False), dst)
    log.info("Wrote upgraded NetParameter text proto to %s", dst)
    return "net"

