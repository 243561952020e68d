"""Depthwise convolution (Convolution with group = channels = num_output): the direct kernel
(engine/depthwise_kernels.py) against grouped im2col on MobileNet v1 layer shapes, forward and
backward.

Run from the repository root: ``PYTHONPATH=$PWD python tests/benchmarks/bench_depthwise.py``.
Prints the median of 5 rounds per shape and the ratio grouped / direct.
"""

from __future__ import annotations

import time

import numpy as np

import engine  # noqa: F401  (before numpy's BLAS threads start)
from engine.blob import Blob
from engine.layer import create_layer
from tests.layer_helpers import layer_param

# (batch, channels, size, stride): MobileNet v1's depthwise layers at 224 input, batch 8
SHAPES = [(8, 32, 112, 1), (8, 64, 112, 2), (8, 128, 56, 1), (8, 256, 28, 1),
          (8, 512, 14, 1), (8, 512, 14, 2), (8, 1024, 7, 1)]


def timed(direct: bool, shape: tuple[int, int, int, int], stride: int) -> tuple[float, float]:
    n, c, size, _ = shape
    text = (f'type: "Convolution" convolution_param {{ num_output: {c} group: {c} kernel_size: 3 '
            f'pad: 1 stride: {stride} weight_filler {{ type: "msra" }} }}')
    layer = create_layer(layer_param(text), 0, np.random.default_rng(0), np.float32)
    bottom = Blob((n, c, size, size), np.float32)
    bottom.data[...] = np.random.default_rng(1).standard_normal(bottom.shape)
    top = [Blob((), np.float32)]
    layer.setup([bottom], top)
    layer.direct = direct
    layer.reshape([bottom], top)
    top[0].diff[...] = 1
    fwd, bwd = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        layer.forward([bottom], top)
        t1 = time.perf_counter()
        layer.backward(top, [True], [bottom])
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return float(np.median(fwd)), float(np.median(bwd))


def main() -> None:
    print(f"{'shape (N,C,H,s)':>22} {'grouped fwd':>11} {'direct fwd':>10} {'x':>5} "
          f"{'grouped bwd':>11} {'direct bwd':>10} {'x':>5}")
    for shape in SHAPES:
        gf, gb = timed(False, shape, shape[3])
        df, db = timed(True, shape, shape[3])
        print(f"{shape!s:>22} {gf * 1e3:10.1f}ms {df * 1e3:9.1f}ms {gf / df:5.1f} "
              f"{gb * 1e3:10.1f}ms {db * 1e3:9.1f}ms {gb / db:5.1f}")


if __name__ == "__main__":
    main()
