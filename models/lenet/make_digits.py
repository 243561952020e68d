"""Convert scikit-learn's bundled UCI digits into the LMDBs this example trains on.

Run once from the repository root (needs the ``dev`` extra, which brings scikit-learn):

    python models/lenet/make_digits.py

The 1,797 8x8 images (values 0..16) become uint8 1x8x8 Datum records with pixel = value * 16,
capped at 255. A seeded, stratified split holds out 36 images of every digit (360 in all) for
testing; the other 1,437 train. Training records are written in a seeded shuffled order because
the Data layer reads in key order and SGD wants the classes mixed. The LMDBs are committed, so
this script is only needed to rebuild them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from engine.data.datum import array_to_datum  # noqa: E402
from engine.data.db import write_lmdb  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 1701
TEST_PER_DIGIT = 36
MAP_SIZE = 1 << 21  # 2 MiB to start (write_lmdb doubles it when full); keeps data.mdb small


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The digits as (N, 1, 8, 8) uint8 images (value * 16, capped at 255) and int labels."""
    from sklearn.datasets import load_digits  # a development dependency only

    digits = load_digits()
    images = np.minimum(digits.images * 16, 255).astype(np.uint8)
    return images[:, None, :, :], digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_per_class: int,
                     seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): ``test_per_class`` random items of every class are held out.

    The train indices come back shuffled, the test indices sorted.
    """
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class]
                           for c in np.unique(labels)])
    train = np.setdiff1d(np.arange(labels.size), test)
    return rng.permutation(train), np.sort(test)


def datum_records(images: np.ndarray, labels: Iterable[int]) -> Iterable[tuple[bytes, bytes]]:
    """(key, serialized Datum) pairs; zero-padded keys keep the given order in the LMDB."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield f"{i:08d}".encode(), array_to_datum(image, int(label)).SerializeToString()


def write_db(path: Path, images: np.ndarray, labels: np.ndarray) -> int:
    """Write a fresh LMDB of Datum records at ``path`` (an old one is replaced)."""
    for name in ("data.mdb", "lock.mdb"):
        if (path / name).exists():
            (path / name).unlink()
    path.mkdir(parents=True, exist_ok=True)
    count = write_lmdb(str(path), datum_records(images, labels), map_size=MAP_SIZE)
    lock = path / "lock.mdb"  # readers open without locking; no need to ship it
    if lock.exists():
        lock.unlink()
    return count


def main() -> None:
    images, labels = load_digits_uint8()
    train, test = stratified_split(labels, TEST_PER_DIGIT)
    for name, index in (("digits_train_lmdb", train), ("digits_test_lmdb", test)):
        path = HERE / name
        count = write_db(path, images[index], labels[index])
        size = os.path.getsize(path / "data.mdb")
        print(f"wrote {count} records to {path.relative_to(ROOT)} ({size // 1024} KiB)")


if __name__ == "__main__":
    main()
