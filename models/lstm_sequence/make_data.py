"""Build the sine-wave streams of the LSTM example: predict each wave's next value.

Run once from the repository root (needs numpy and h5py only):

    python models/lstm_sequence/make_data.py

Every one of the 8 streams is a run of sequences of SEQ_LEN steps; each sequence is a sine wave
with its own frequency, phase and amplitude. At each step the input is the wave's value and the
target is its value one step later. ``cont`` is 0 at the first step of every sequence and 1
elsewhere, as Caffe's recurrent layers expect. Rows are time steps (dataset shapes (rows, 8, 1)
and (rows, 8)), so an HDF5Data layer with batch_size T serves T x 8 time-major batches, and a
sequence (40 steps) spans two batches of 20: the LSTM carries its state across them.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
STREAMS = 8
SEQ_LEN = 40
SEED = 3


def make_streams(sequences: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``sequences`` sine waves per stream, laid end to end: data, cont and label datasets."""
    steps = np.arange(SEQ_LEN + 1)
    shape = (sequences, 1, STREAMS)
    omega = rng.uniform(0.15, 0.5, shape)
    phase = rng.uniform(0, 2 * np.pi, shape)
    amplitude = rng.uniform(0.5, 1.0, shape)
    waves = amplitude * np.sin(omega * steps[None, :, None] + phase)  # (seq, 41, streams)
    data = waves[:, :-1].reshape(-1, STREAMS, 1)
    label = waves[:, 1:].reshape(-1, STREAMS, 1)
    cont = np.ones((sequences, SEQ_LEN, STREAMS))
    cont[:, 0] = 0
    return {"data": data.astype(np.float32), "cont": cont.reshape(-1, STREAMS).astype(np.float32),
            "label": label.astype(np.float32)}


def main() -> None:
    rng = np.random.default_rng(SEED)
    for name, sequences in (("train", 10), ("test", 4)):
        path = HERE / f"{name}.h5"
        with h5py.File(path, "w") as f:
            for key, values in make_streams(sequences, rng).items():
                f.create_dataset(key, data=values)
        (HERE / f"{name}_h5.txt").write_text(f"models/lstm_sequence/{name}.h5\n")
        print(f"wrote {path.relative_to(HERE.parents[1])}: {sequences * SEQ_LEN} rows of "
              f"{STREAMS} streams")


if __name__ == "__main__":
    main()
