"""Caffe's data formats and input pipeline: Datum codec, LMDB and HDF5 sources, mean files,
image decoding and the DataTransformer. The data layers themselves are in engine/layers/data.py.
"""

from engine.data.datum import array_to_datum, datum_to_array, parse_datum
from engine.data.db import LMDBReader, open_db, read_lmdb, read_mean, write_lmdb, write_mean
from engine.data.image import decode_image, encode_image, read_image
from engine.data.transformer import DataTransformer

__all__ = [
    "DataTransformer",
    "LMDBReader",
    "array_to_datum",
    "datum_to_array",
    "decode_image",
    "encode_image",
    "open_db",
    "parse_datum",
    "read_image",
    "read_lmdb",
    "read_mean",
    "write_lmdb",
    "write_mean",
]
