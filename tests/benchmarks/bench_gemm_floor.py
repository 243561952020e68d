"""The GEMM floor: how long the matrix products of Caffe's algorithm take alone on this machine.

Caffe (and Moka) compute a convolution as im2col + GEMM and an InnerProduct as a GEMM. For
each net of ``bench_nets.py`` this script derives every GEMM a forward+backward needs -- per
layer the forward product, the weight gradient and the input gradient (none for the first layer,
whose bottom is data) -- and times each alone with numpy's BLAS on ready-made float32 operands,
in whichever of the two equivalent orientations (``A @ B`` or ``(B.T @ A.T).T``) runs faster.
Their sum is a lower bound for any im2col + GEMM implementation on this machine: it leaves out
im2col/col2im, pooling, LRN, ReLU, the loss and the update.

    PYTHONPATH=$PWD python tests/benchmarks/bench_gemm_floor.py [--nets lenet,cifar,alexnet]
                                                                 [--threads 2] [--repeat 7]

The report gives the floor per net with its FLOPs and rate, and a 4096x4096 product for the
machine's best GEMM rate. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nets import NETS  # the architectures, defined once


def gemm_shapes(name: str) -> list[tuple[str, int, int, int, int, bool]]:
    """(layer, M, K, N, groups, input gradient wanted) of each conv/ip layer's GEMMs:
    forward ``(M x K) @ (K x N)`` per group, with M rows of columns (batch x output cells)."""
    spec = NETS[name]
    batch, (channels, height, width) = spec["input"][0], spec["input"][1:]
    shapes, first = [], True
    for kind, *args in spec["layers"]:
        if kind == "conv":
            n, k, pad, stride, group = (*args, 1, 1)[:5]
            height = (height + 2 * pad - k) // stride + 1
            width = (width + 2 * pad - k) // stride + 1
            shapes.append((f"conv {n} {k}x{k}", batch * height * width,
                           k * k * channels // group, n // group, group, not first))
            channels, first = n, False
        elif kind == "pool":
            _, k, stride = args
            height = math.ceil((height - k) / stride) + 1
            width = math.ceil((width - k) / stride) + 1
        elif kind == "ip":
            shapes.append((f"ip {args[0]}", batch, channels * height * width, args[0], 1,
                           not first))
            channels, height, width, first = args[0], 1, 1, False
    return shapes


def median_ms(run: Callable[[], object], repeat: int) -> float:
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def fastest(a, b, out, repeat: int) -> float:
    """ms of ``out = a @ b``, the better of the two orientations."""
    import numpy as np

    return min(median_ms(lambda: np.matmul(a, b, out=out), repeat),
               median_ms(lambda: np.matmul(b.T, a.T, out=out.T), repeat))


def floor(name: str, repeat: int) -> tuple[list[tuple[str, float, float, float]], float]:
    """Per layer (name, forward, weight gradient, input gradient ms) and the net's GFLOP."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows, flops = [], 0.0
    for layer, m, k, n, group, input_gradient in gemm_shapes(name):
        columns = rng.standard_normal((m, k), np.float32)
        weight = rng.standard_normal((k, n), np.float32)
        top_diff = rng.standard_normal((m, n), np.float32)
        forward = fastest(columns, weight, np.empty((m, n), np.float32), repeat)
        weight_grad = fastest(columns.T, top_diff, np.empty((k, n), np.float32), repeat)
        input_grad = (fastest(top_diff, weight.T, np.empty((m, k), np.float32), repeat)
                      if input_gradient else 0.0)
        rows.append((layer, group * forward, group * weight_grad, group * input_grad))
        flops += 2.0 * m * k * n * group * (3 if input_gradient else 2)
    return rows, flops / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="lenet,cifar,alexnet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per GEMM")
    args = parser.parse_args(argv)
    os.environ["MOKA_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import numpy as np

    import engine  # noqa: F401  (sets BLAS's threads from MOKA_NUM_THREADS)

    square = np.random.default_rng(1).standard_normal((4096, 4096), np.float32)
    best = 2 * 4096 ** 3 / 1e9 / median_ms(lambda: square @ square, 3) * 1e3
    print(f"numpy {np.__version__}, {args.threads} BLAS threads; 4096x4096 float32 GEMM: "
          f"{best:.0f} GFLOP/s")
    print(f"{'net':<8}{'layer':<16}{'forward':>9}{'dW':>9}{'dX':>9}  (ms, GEMMs alone)")
    for name in args.nets.split(","):
        rows, gflop = floor(name, args.repeat)
        for layer, forward, weight_grad, input_grad in rows:
            print(f"{name:<8}{layer:<16}{forward:>9.2f}{weight_grad:>9.2f}{input_grad:>9.2f}")
        total = sum(sum(row[1:]) for row in rows)
        print(f"{name:<8}{'total':<16}{total:>9.1f} ms for {gflop:.2f} GFLOP "
              f"({gflop / total * 1e3:.0f} GFLOP/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
