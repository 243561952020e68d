"""Direct depthwise convolution: each output channel reads exactly one input channel with its
own filter (``group == channels == num_output``, MobileNet's depthwise layers).

Instead of im2col + one GEMM per group (a GEMM of one row per group), one multiply-add per kernel
offset over strided views of the padded input, in blocks of whole (image, channel) planes that
stay in cache. Measured with ``tests/benchmarks/bench_depthwise.py`` (MobileNet v1 shapes, batch 8,
2 vCPUs): forward 1.8-3.4x and backward 3.5-9.5x faster than grouped im2col.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.kernels import ConvGeometry, Workspace, kernel_offsets, offset_slices
from engine.parallel import for_batch_blocks, for_batch_chunks

# Work in blocks of whole (image, channel) planes small enough to stay in cache: each block
# goes through every kernel offset before the next is read.
BLOCK_WORK = 1 << 15  # elements per block (128 KB of float32); 16K-256K measured


def _planes(array: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (N*C, *spatial), a view."""
    return array.reshape(-1, *array.shape[2:])


def _cells(geom: ConvGeometry, offset: Sequence[int], out_size: Sequence[int]) -> tuple:
    """Index of the padded-plane cells that kernel ``offset`` meets, over (planes, *spatial)."""
    return (slice(None), *offset_slices(offset, geom.stride, out_size, geom.dilation))


def _padded(x: np.ndarray, geom: ConvGeometry, ws: Workspace) -> np.ndarray:
    """The planes of ``x`` (N, C, *spatial) inside a zero border of ``pad`` cells."""
    if not any(geom.pad):
        return _planes(x)
    xp = ws.get("xp", (x.shape[0] * x.shape[1], *geom.padded(x.shape[2:])), x.dtype, fill=0)
    inner = (slice(None), *(slice(p, p + s) for p, s in zip(geom.pad, x.shape[2:], strict=True)))
    planes = _planes(x)
    for_batch_chunks(lambda a, b: np.copyto(xp[a:b][inner], planes[a:b]), len(xp),
                     planes[0].size)
    return xp


def _plane_taps(weight: np.ndarray, n: int) -> np.ndarray:
    """(N*C, 1, ..., T): the kernel taps of each plane's channel, broadcastable over a plane."""
    taps = np.tile(weight.reshape(weight.shape[0], -1), (n, 1))
    return taps.reshape(taps.shape[0], *(1,) * (weight.ndim - 2), taps.shape[1])


def depthwise_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                      geom: ConvGeometry, ws: Workspace, out: np.ndarray) -> None:
    """``out[n, c] = sum_k weight[c, 0, k] * x_padded[n, c, window + k] (+ bias[c])``."""
    xp, y = _padded(x, geom, ws), _planes(out)
    taps = _plane_taps(weight, x.shape[0])
    offsets = list(enumerate(kernel_offsets(geom.kernel)))
    shift = None if bias is None else np.tile(bias, x.shape[0]).reshape(
        -1, *(1,) * (x.ndim - 2))

    def run(_worker: int, a: int, b: int) -> None:
        block, scratch = y[a:b], np.empty_like(y[a:b])
        for t, offset in offsets:
            target = block if t == 0 else scratch
            np.multiply(xp[a:b][_cells(geom, offset, y.shape[1:])], taps[a:b, ..., t],
                        out=target)
            if t:
                block += scratch
        if shift is not None:
            block += shift[a:b]

    for_batch_blocks(run, len(y), y[0].size, BLOCK_WORK)


def depthwise_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, geom: ConvGeometry,
                       ws: Workspace, weight_diff: np.ndarray | None,
                       bias_diff: np.ndarray | None, dx: np.ndarray | None) -> None:
    """Accumulate the weight and bias diffs, overwrite ``dx``; any of them may be None."""
    n, c = x.shape[:2]
    if bias_diff is not None:
        bias_diff += dy.sum(axis=(0, *range(2, dy.ndim)))
    offsets = list(enumerate(kernel_offsets(geom.kernel)))
    g, out_size = _planes(dy), dy.shape[2:]
    axes = "defgh"[:x.ndim - 2]
    if weight_diff is not None:
        xp = _padded(x, geom, ws)
        dw = np.empty((n * c, len(offsets)), dy.dtype)

        def weights(_worker: int, a: int, b: int) -> None:
            for t, offset in offsets:
                dw[a:b, t] = np.einsum(f"p{axes},p{axes}->p",
                                       xp[a:b][_cells(geom, offset, out_size)], g[a:b])

        for_batch_blocks(weights, n * c, g[0].size, BLOCK_WORK)
        weight_diff += dw.reshape(n, c, -1).sum(axis=0).reshape(weight_diff.shape)
    if dx is None:
        return
    taps = _plane_taps(weight, n)
    padded = any(geom.pad)
    dxp = ws.get("dxp", (n * c, *geom.padded(x.shape[2:])), x.dtype) if padded else _planes(dx)
    inner = (slice(None), *(slice(p, p + s) for p, s in zip(geom.pad, x.shape[2:], strict=True)))
    dx_planes = _planes(dx)

    def data(_worker: int, a: int, b: int) -> None:
        block, scratch = dxp[a:b], np.empty_like(g[a:b])
        block[...] = 0
        for t, offset in offsets:
            np.multiply(g[a:b], taps[a:b, ..., t], out=scratch)
            target = block[_cells(geom, offset, out_size)]
            target += scratch
        if padded:
            dx_planes[a:b] = block[inner]

    for_batch_blocks(data, n * c, g[0].size, BLOCK_WORK)
