"""engine.kernels: output sizes, im2col/col2im, the convolution kernels, phase planes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine import kernels
from engine.kernels import (
    ConvGeometry,
    PhasePlanes,
    PoolAxis,
    Workspace,
    col2im_add,
    conv_backward_data,
    conv_backward_params,
    conv_forward,
    conv_out_size,
    im2col_nhwc,
    kernel_offsets,
    nhwc_buffer,
    pad_to_nhwc,
    pool_out_size,
)


@pytest.mark.parametrize(("args", "expected"), [
    ((28, 5), 24), ((32, 5, 2), 32), ((7, 3, 1, 2), 4), ((8, 3, 0, 2), 3), ((9, 3, 0, 1, 3), 3),
    ((10, 2, 1, 3, 2), 4),
])
def test_conv_out_size(args, expected):
    assert conv_out_size(*args) == expected


@pytest.mark.parametrize(("args", "expected"), [
    ((24, 2, 0, 2), 12), ((32, 3, 0, 2), 16), ((7, 3, 0, 2), 3), ((6, 3, 0, 2), 3),
    ((6, 3, 0, 2, False), 2), ((7, 2, 1, 2), 4), ((6, 2, 1, 2), 4), ((5, 1, 0, 3), 3),
    ((4, 6, 0, 3), 1), ((4, 6, 0, 1), -1),
])
def test_pool_out_size(args, expected):
    assert pool_out_size(*args) == expected


def test_kernel_offsets_are_row_major():
    assert list(kernel_offsets((2, 3))) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert list(kernel_offsets(())) == [()]


@pytest.mark.parametrize("channels_last", [True, False])
def test_nhwc_buffer_layouts(channels_last):
    buf = nhwc_buffer(2, (3, 4), 5, np.float32, channels_last)
    assert buf.shape == (2, 3, 4, 5) and not buf.any()
    assert buf.flags.c_contiguous == channels_last
    assert buf.base is None or buf.base.shape == (5, 2, 3, 4)


def test_workspace_reuses_and_reallocates():
    ws = Workspace()
    a = ws.get("a", (2, 3), np.float32, fill=7)
    a[0, 0] = 1
    assert ws.get("a", (2, 3), np.float32, fill=7) is a and a[0, 0] == 1  # filled once
    b = ws.get("a", (3, 3), np.float32, fill=7)
    assert b is not a and (b == 7).all()
    assert ws.get("a", (3, 3), np.float64).dtype == np.float64


def naive_im2col(x, kernel, stride, pad, dilation):
    """(N, *out, *kernel, C) with zero padding, from (N, C, *spatial)."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    out = [conv_out_size(*a) for a in zip(spatial, kernel, pad, stride, dilation, strict=True)]
    cols = np.zeros((n, *out, *kernel, c))
    for pos in itertools.product(*map(range, out)):
        for tap in itertools.product(*map(range, kernel)):
            cell = [q * s - p + t * d for q, s, p, t, d in
                    zip(pos, stride, pad, tap, dilation, strict=True)]
            if all(0 <= i < size for i, size in zip(cell, spatial, strict=True)):
                cols[(slice(None), *pos, *tap)] = x[(slice(None), slice(None), *cell)]
    return cols


@pytest.mark.parametrize(("shape", "kernel", "stride", "pad", "dilation"), [
    ((2, 3, 6, 7), (3, 2), (1, 2), (1, 0), (1, 1)),
    ((1, 2, 9, 8), (2, 3), (2, 1), (2, 1), (3, 2)),
    ((2, 4, 7), (3,), (2,), (1,), (2,)),
    ((1, 2, 4, 5, 3), (2, 2, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2)),
])
@pytest.mark.parametrize("channels_last", [True, False])
def test_im2col_and_its_adjoint(shape, kernel, stride, pad, dilation, channels_last):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    n, c, spatial = shape[0], shape[1], shape[2:]
    padded = [s + 2 * p for s, p in zip(spatial, pad, strict=True)]
    xp = nhwc_buffer(n, padded, c, x.dtype, channels_last)
    pad_to_nhwc(x, pad, xp)
    out = [conv_out_size(*a) for a in zip(spatial, kernel, pad, stride, dilation, strict=True)]
    cols = im2col_nhwc(xp, kernel, stride, dilation, out)
    np.testing.assert_array_equal(cols, naive_im2col(x, kernel, stride, pad, dilation))
    # col2im is the adjoint: <im2col(x), g> == <x, col2im(g)> (on the padded array)
    g = rng.standard_normal(cols.shape)
    back = nhwc_buffer(n, padded, c, x.dtype, channels_last)
    col2im_add(g, back, stride, dilation)
    np.testing.assert_allclose(np.vdot(cols, g), np.vdot(xp, back))


CONV = [
    ((2, 3, 7, 6), 4, ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))),
    ((2, 4, 8, 9), 6, ConvGeometry((3, 2), (2, 3), (1, 2), (2, 1), 2)),
    ((2, 16, 5, 6), 4, ConvGeometry((2, 3), (1, 2), (0, 1), (1, 1), 2)),
    ((2, 3, 9), 2, ConvGeometry((3,), (2,), (2,), (2,))),
    ((1, 2, 4, 5, 6), 3, ConvGeometry((2, 3, 2), (2, 1, 3), (1, 1, 0), (1, 1, 2))),
]


@pytest.mark.parametrize(("shape", "o", "geom"), CONV)
def test_conv_kernels_agree_with_im2col_gemm(shape, o, geom):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    n, c, spatial = shape[0], shape[1], shape[2:]
    g, cg, og = geom.group, c // geom.group, o // geom.group
    w = rng.standard_normal((o, cg, *geom.kernel))
    b = rng.standard_normal(o)
    cols = naive_im2col(x, geom.kernel, geom.stride, geom.pad, geom.dilation)
    out = cols.shape[1:1 + len(spatial)]
    cols = cols.reshape(n, *out, -1, c)
    expected = np.concatenate([
        np.einsum("n...kc,okc->no...", cols[..., i * cg:(i + 1) * cg],
                  np.moveaxis(w[i * og:(i + 1) * og], 1, -1).reshape(og, -1, cg))
        for i in range(g)], axis=1) + b.reshape(o, *[1] * len(spatial))
    y = np.empty((n, o, *out))
    ws = Workspace()
    matrix = conv_forward(x, w, b, geom, ws, y)
    np.testing.assert_allclose(y, expected, atol=1e-12)

    # backward kernels are the adjoints of forward: compare with <dy, y(x, w)> derivatives
    dy = rng.standard_normal(y.shape)
    dw, db, dx = np.zeros_like(w), np.zeros_like(b), np.empty_like(x)
    conv_backward_params(dy, matrix, geom, Workspace(), dw, db)
    conv_backward_data(dy, w, geom, Workspace(), dx)
    np.testing.assert_allclose(db, dy.sum(axis=(0, *range(2, dy.ndim))), atol=1e-12)
    y0 = np.empty_like(y)
    conv_forward(x, w, np.zeros_like(b), geom, Workspace(), y0)
    np.testing.assert_allclose(np.vdot(dy, y0), np.vdot(dw, w), atol=1e-9)  # linear in w
    np.testing.assert_allclose(np.vdot(dy, y0), np.vdot(dx, x), atol=1e-9)  # linear in x


@pytest.mark.parametrize(("shape", "o", "geom"), CONV[:3])
@pytest.mark.parametrize("count", [7, 3])
@pytest.mark.parametrize("wanted", ["both", "weights", "bias"])
def test_weight_gradient_blocks_sum_to_the_one_gemm(monkeypatch, shape, o, geom, count, wanted):
    """Per-sample blocks and 3 blocks of 2-3 samples give the one GEMM's gradients."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, *shape[1:]))
    w = rng.standard_normal((o, shape[1] // geom.group, *geom.kernel))
    y = np.empty((7, o, *geom.out_size(shape[2:])))
    matrix = conv_forward(x, w, None, geom, Workspace(), y)
    dy = rng.standard_normal(y.shape)
    p = y[0, 0].size
    monkeypatch.setattr(kernels, "DW_SAMPLE_INNER", p + 1)
    monkeypatch.setattr(kernels, "DW_BLOCK_INNER", 7 * p // count)
    results = []
    for ratio in (0, 10**9):  # one GEMM, then blocks
        monkeypatch.setattr(kernels, "DW_OUTPUT_RATIO", ratio)
        assert kernels._dw_blocks(7, p, matrix.shape[2] * o // geom.group) == count * (ratio > 0)
        dw = np.zeros_like(w) if wanted != "bias" else None
        db = np.zeros(o) if wanted != "weights" else None
        conv_backward_params(dy, matrix, geom, Workspace(), dw, db)
        results.append((dw, db))
    for one, blocked in zip(*results, strict=True):
        if one is not None:
            np.testing.assert_allclose(blocked, one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("size", "kernel", "stride", "pad", "round_up"), [
    (7, 3, 2, 0, True), (7, 2, 2, 1, True), (6, 3, 2, 1, False), (8, 2, 3, 0, True),
    (5, 3, 1, 1, True), (9, 4, 2, 3, True),
])
def test_phase_planes_views_and_round_trip(size, kernel, stride, pad, round_up):
    axis = PoolAxis(size, kernel, stride, pad, pool_out_size(size, kernel, pad, stride, round_up))
    grid = PhasePlanes((2, 3), (axis, axis))
    x = np.random.default_rng(2).standard_normal((2, 3, size, size))
    planes = np.full(grid.shape, np.nan)
    grid.load(x, planes)
    for offset in kernel_offsets((kernel, kernel)):
        view = grid.view(planes, offset)
        assert view.shape == grid.wide_shape and view.flags.c_contiguous
        view = grid.narrow(view)
        for ph, pw in itertools.product(range(axis.out), repeat=2):
            h, w = ph * stride - pad + offset[0], pw * stride - pad + offset[1]
            if 0 <= h < size and 0 <= w < size:
                assert view[1, 2, ph, pw] == x[1, 2, h, w]
            else:
                assert np.isnan(view[1, 2, ph, pw])
    back = np.full_like(x, np.nan)
    grid.store(planes, back)
    in_windows = np.zeros(size, bool)
    for ph in range(axis.out):
        in_windows[max(ph * stride - pad, 0):max(ph * stride - pad + kernel, 0)] = True
    mask = np.logical_and.outer(in_windows, in_windows)
    np.testing.assert_array_equal(back[..., mask], x[..., mask])
    written = ~np.isnan(back)
    np.testing.assert_array_equal(back[written], x[written])
    assert grid.covers_input() == written.all()
