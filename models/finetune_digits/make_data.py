"""Build the fine-tuning task's LMDBs: digit parity (0 = even, 1 = odd) on the UCI digits.

Run once from the repository root (needs the ``dev`` extra, which brings scikit-learn):

    python models/finetune_digits/make_data.py

It reuses models/lenet/make_digits.py: the same images and the same held-out split, so the
parity test set (all 360 held-out images) was never seen by the LeNet being fine-tuned. The
training set is deliberately small, 30 images of every digit (300 in all) drawn with a fixed
seed from LeNet's training split: the frozen features carry the task, only the new classifier
learns.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TRAIN_PER_DIGIT = 30
SEED = 5


def _load_make_digits():
    path = HERE.parent / "lenet" / "make_digits.py"
    spec = importlib.util.spec_from_file_location("make_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    digits = _load_make_digits()
    images, labels = digits.load_digits_uint8()
    train, test = digits.stratified_split(labels, digits.TEST_PER_DIGIT)
    rng = np.random.default_rng(SEED)
    subset = np.concatenate([rng.permutation(train[labels[train] == c])[:TRAIN_PER_DIGIT]
                             for c in range(10)])
    subset = rng.permutation(subset)
    for name, index in (("parity_train_lmdb", subset), ("parity_test_lmdb", test)):
        path = HERE / name
        count = digits.write_db(path, images[index], labels[index] % 2)
        size = os.path.getsize(path / "data.mdb")
        print(f"wrote {count} records to {path.relative_to(digits.ROOT)} ({size // 1024} KiB)")


if __name__ == "__main__":
    main()
