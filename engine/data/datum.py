"""Datum: Caffe's record for one image and its label in an LMDB.

A Datum holds ``channels``, ``height``, ``width`` and the pixels in CHW order, either as raw uint8
bytes (``data``), as floats (``float_data``), or, when ``encoded`` is true, as the bytes of a
JPEG/PNG file (``data``) whose size fields may be unset (convert_imageset --encoded leaves them 0).
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from engine import caffe_pb2
from engine.data.image import decode_image, encode_image
from engine.errors import DataError


def array_to_datum(array: np.ndarray, label: int = 0, encode: str | None = None):
    """A Datum holding a CHW array: uint8 → raw bytes, anything else → ``float_data``.

    ``encode="PNG"`` (or ``"JPEG"``) stores a uint8 array as an encoded image instead; its channels
    are taken to be in BGR(A) order, as ``datum_to_array`` returns them.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise DataError(f"a Datum holds a 3-d (channels, height, width) array; got shape "
                        f"{array.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = array.shape
    datum.label = int(label)
    if encode is not None:
        datum.data = encode_image(array, encode)
        datum.encoded = True
    elif array.dtype == np.uint8:
        datum.data = np.ascontiguousarray(array).tobytes()
    else:
        datum.float_data.extend(np.asarray(array, np.float32).ravel().tolist())
    return datum


def datum_to_array(datum, color: bool | None = None, where: str = "datum") -> np.ndarray:
    """The CHW pixels of a Datum: uint8 for raw or encoded data, float32 for ``float_data``.

    ``color`` only matters for encoded data: None keeps the image's channels, True forces BGR,
    False forces one gray channel (Caffe's force_color / force_gray).
    """
    if datum.encoded:
        return decode_image(datum.data, color, where)
    shape = (datum.channels, datum.height, datum.width)
    count = int(np.prod(shape))
    if len(datum.data):
        values = np.frombuffer(datum.data, np.uint8)
    elif len(datum.float_data):
        values = np.asarray(datum.float_data, np.float32)
    else:
        raise DataError(f"{where}: the Datum holds no pixels (neither data nor float_data)")
    if count <= 0 or values.size != count:
        raise DataError(f"{where}: the Datum declares {shape[0]}x{shape[1]}x{shape[2]} = {count} "
                        f"values but holds {values.size}; the record is corrupt")
    return values.reshape(shape)


def parse_datum(value: bytes, where: str = "record"):
    """Parse serialized Datum bytes; a value that is not a Datum is a DataError."""
    try:
        return caffe_pb2.Datum.FromString(value)
    except DecodeError as exc:
        raise DataError(f"{where}: the value is not a serialized Datum ({exc}); the source is "
                        f"not a Caffe image DB or is corrupt") from exc
