"""``engine extract-features``: Caffe's tools/extract_features.cpp.

The net is built in the TEST phase from ``--model`` with ``--weights``; each of ``--iterations``
forward passes writes every item of every named blob as one Datum to that blob's LMDB:
``channels``/``height``/``width`` are the blob's legacy 4-d dims (1 where the blob has fewer
axes), ``float_data`` the item's ``count / num`` values, and the keys are the item's running
index as ten zero-padded digits (``0000000000``, ``0000000001``, ...), as Caffe's
``format_int(index, 10)``. Transactions commit every 1,000 items, as Caffe's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np

from engine import caffe_pb2
from engine.data.db import put_all
from engine.errors import DataError, MokaError
from engine.layer import TEST

log = logging.getLogger(__name__)

COMMIT_EVERY = 1000


def feature_datum(item: np.ndarray, shape: tuple[int, ...]) -> caffe_pb2.Datum:
    """One item of a blob of ``shape`` as a float Datum (legacy channels/height/width)."""
    datum = caffe_pb2.Datum()
    datum.channels = shape[1] if len(shape) > 1 else 1
    datum.height = shape[2] if len(shape) > 2 else 1
    datum.width = shape[3] if len(shape) > 3 else 1
    datum.float_data.extend(np.asarray(item, np.float32).reshape(-1).tolist())
    return datum


class _FeatureDB:
    """An LMDB written in transactions of 1,000 puts; the map grows when it fills."""

    def __init__(self, path: str) -> None:
        if os.path.exists(os.path.join(path, "data.mdb")):
            raise DataError(f"feature DB '{path}' already exists; remove it or choose another "
                            "--db (Caffe's extract_features refuses to overwrite too)")
        self.path = path
        self.env = lmdb.open(path, map_size=1 << 26, subdir=True)
        self.pending: list[tuple[bytes, bytes]] = []
        self.count = 0

    def put(self, datum: caffe_pb2.Datum) -> None:
        self.pending.append((f"{self.count:010d}".encode(), datum.SerializeToString()))
        self.count += 1
        if self.count % COMMIT_EVERY == 0:
            self.commit()

    def commit(self) -> None:
        if self.pending:
            put_all(self.env, self.pending)
            self.pending = []

    def close(self) -> None:
        self.commit()
        self.env.close()


def db_paths(blobs: Sequence[str], db: str) -> list[str]:
    """One DB per blob: ``--db a,b`` names them in order; one name for several blobs is a
    folder holding a DB per blob (its name with ``/`` made ``_``)."""
    names = [d for d in db.split(",") if d]
    if len(names) == len(blobs):
        return names
    if len(names) == 1:
        return [os.path.join(names[0], b.replace("/", "_")) for b in blobs]
    raise MokaError(f"--db names {len(names)} databases for {len(blobs)} blobs; give one per "
                    "blob (comma separated, as Caffe's extract_features) or one folder")


def extract_features(model: str, weights: str | None, blobs: Sequence[str], db: str,
                     iterations: int = 1, level: int = 0,
                     stages: Sequence[str] = ()) -> dict[str, int]:
    """Run ``iterations`` TEST forwards and store ``blobs``; returns the items written per blob."""
    from engine.net import Net

    if not blobs:
        raise MokaError("name the blobs to extract: --blobs fc7 or --blobs fc6,fc7")
    net = Net(model, phase=TEST, level=level, stages=stages, rng=np.random.default_rng(0))
    if weights:
        net.copy_from(weights)
    for name in blobs:
        if name not in net.blobs:
            raise MokaError(f"unknown feature blob name '{name}' in net '{net.name}'; its blobs "
                            f"are {', '.join(net.blobs)}")
    paths = db_paths(blobs, db)
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    dbs = [_FeatureDB(p) for p in paths]
    log.info("Extracting Features")
    try:
        for _ in range(iterations):
            net.forward_from_to()
            for name, out in zip(blobs, dbs, strict=True):
                blob = net.blobs[name]
                data = blob.data.reshape(blob.num, -1) if blob.num_axes else \
                    blob.data.reshape(1, 1)
                for item in data:
                    out.put(feature_datum(item, blob.shape))
                    if out.count % COMMIT_EVERY == 0:
                        log.info("Extracted features of %d query images for feature blob %s",
                                 out.count, name)
    finally:
        for out in dbs:
            out.close()
    for name, out in zip(blobs, dbs, strict=True):
        log.info("Extracted features of %d query images for feature blob %s", out.count, name)
    log.info("Successfully extracted the features!")
    return {name: out.count for name, out in zip(blobs, dbs, strict=True)}


# -- the command line ------------------------------------------------------------------------------
def run(args) -> int:
    """Write named blobs of TEST forwards to LMDBs of float Datums (Caffe's extract_features)."""
    if not args.model:
        raise MokaError("need a model definition: --model NET.prototxt")
    if not os.path.isfile(args.model):
        raise MokaError(f"model file '{args.model}' not found")
    if args.weights and not os.path.isfile(args.weights):
        raise MokaError(f"weights file '{args.weights}' not found")
    if args.backend != "lmdb":
        raise MokaError(f"--backend {args.backend} is not supported; only lmdb can be written")
    if not args.db:
        raise MokaError("need where to write: --db OUT (one per blob, comma separated)")
    stages = [s for value in args.stage or () for s in value.split(",") if s]
    extract_features(args.model, args.weights, [b for b in args.blobs.split(",") if b],
                     args.db, args.iterations, args.level, stages)
    return 0


def add_commands(subparsers, add_command, net_state_flags) -> None:
    """Register ``engine extract-features`` (from engine/cli.py)."""
    p = add_command(subparsers, run, "extract-features")
    p.add_argument("--model", help="the net prototxt (built in the TEST phase)")
    p.add_argument("--weights", help="the trained .caffemodel")
    p.add_argument("--blobs", default="", help="blob names to extract, comma separated")
    p.add_argument("--db", help="the LMDB(s) to write: one per blob, comma separated")
    p.add_argument("--iterations", type=int, default=1, help="forward passes (batches)")
    p.add_argument("--backend", default="lmdb", help="the DB type (only lmdb)")
    net_state_flags(p)
