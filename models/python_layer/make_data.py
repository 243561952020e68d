"""Write the linear-regression data of this example (run from the repository root):

    python models/python_layer/make_data.py

y = x . w + b + noise with x ~ N(0, 1) of 4 features, w = (1.5, -2, 0.5, 3), b = -1 and
noise ~ N(0, 0.1^2), seeded; 256 training rows and 64 test rows, as HDF5 datasets "data"
(N x 4) and "label" (N x 1), float32, listed in train.txt / test.txt for the HDF5Data layers.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

FOLDER = Path(__file__).resolve().parent
WEIGHTS = np.array([1.5, -2.0, 0.5, 3.0])
BIAS = -1.0
NOISE = 0.1


def make(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, WEIGHTS.size))
    y = x @ WEIGHTS + BIAS + NOISE * rng.standard_normal(n)
    return x.astype(np.float32), y.reshape(n, 1).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(2015)
    for split, n in (("train", 256), ("test", 64)):
        x, y = make(n, rng)
        with h5py.File(FOLDER / f"{split}.h5", "w") as f:
            f.create_dataset("data", data=x)
            f.create_dataset("label", data=y)
        (FOLDER / f"{split}.txt").write_text(f"models/python_layer/{split}.h5\n")


if __name__ == "__main__":
    main()
