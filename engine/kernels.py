"""Shared vectorised kernels for the vision layers: output sizes, window views, im2col / col2im,
convolution forward and backward, and pooling's phase planes.

Convolution works on *logical NHWC* arrays: axes ``(N, *spatial, C)`` with the channel last, so
one im2col copy yields columns ordered (kernel offset..., channel). How such an array is *stored*
is a separate choice (``nhwc_buffer``): channel-innermost ``(N, *spatial, C)`` or
channel-outermost ``(C, N, *spatial)``, whichever lets numpy's im2col copy move longer contiguous
runs (``ConvGeometry.channels_last``). The functions here read only logical axes.

Numpy runs a strided elementwise loop several times slower than a contiguous one, so pooling
first splits a strided input into *phase planes* (every ``stride``-th cell, one plane per phase),
where each window offset is a contiguous shifted view.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from engine.parallel import for_batch_chunks, for_each_block, num_threads


# -- sizes and offsets -------------------------------------------------------------------------
def conv_out_size(size: int, kernel: int, pad: int = 0, stride: int = 1,
                  dilation: int = 1) -> int:
    """Caffe's convolution output size: ``(size + 2*pad - (dilation*(kernel-1)+1)) // stride + 1``.

    The caller checks that the dilated kernel fits into the padded input.
    """
    extent = dilation * (kernel - 1) + 1
    return (size + 2 * pad - extent) // stride + 1


def pool_out_size(size: int, kernel: int, pad: int = 0, stride: int = 1,
                  round_up: bool = True) -> int:
    """Caffe's pooling output size: ``ceil((size + 2*pad - kernel) / stride) + 1`` (or floor).

    Only when ``pad > 0``: if the last window would start at or beyond ``size + pad`` (entirely
    in the padding), it is dropped.
    """
    span = (size + 2 * pad - kernel) / stride
    out = (math.ceil(span) if round_up else math.floor(span)) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def kernel_offsets(kernel: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every offset inside a kernel, in row-major (Caffe's loop) order."""
    return itertools.product(*(range(k) for k in kernel))


def offset_slices(offset: Sequence[int], stride: Sequence[int], out_size: Sequence[int],
                  dilation: Sequence[int] | None = None) -> tuple[slice, ...]:
    """Slices over padded spatial axes picking the cell that kernel ``offset`` meets in each of
    the ``out_size`` windows (window ``i`` starts at ``stride * i``)."""
    dilation = dilation or (1,) * len(offset)
    return tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                 for o, s, d, n in zip(offset, stride, dilation, out_size, strict=True))


def batch_copyto(dst: np.ndarray, src: np.ndarray) -> None:
    """``np.copyto(dst, src)``, split over the leading (batch) axis onto parallel threads."""
    for_batch_chunks(lambda a, b: np.copyto(dst[a:b], src[a:b]), dst.shape[0], dst[0].size)


def batch_add(target: np.ndarray, values: np.ndarray) -> None:
    """``target += values``, split over the leading (batch) axis onto parallel threads."""
    def add(a: int, b: int) -> None:
        np.add(target[a:b], values[a:b], out=target[a:b])
    for_batch_chunks(add, target.shape[0], target[0].size)


def batch_fill(dst: np.ndarray, value: float) -> None:
    """``dst[...] = value``, split over the leading (batch) axis onto parallel threads."""
    for_batch_chunks(lambda a, b: dst[a:b].fill(value), dst.shape[0], dst[0].size)


class Workspace:
    """Named scratch arrays kept between calls; reallocated only when a shape or dtype changes.

    With ``fill`` an array is set to that value when (re)allocated, and only then: callers that
    write just an interior rely on the border keeping it.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._children: dict[object, Workspace] = {}
        self.kept: np.ndarray | None = None  # a result its user keeps here between calls

    def child(self, key: object) -> Workspace:
        """A workspace of its own under ``key`` (kept): batch blocks of different lengths get
        one each, so that a short last block does not reallocate the others' arrays."""
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = Workspace()
        return child

    def lane(self, index: int) -> Workspace:
        """The workspace of thread lane ``index`` (work running beside this workspace's own on
        another thread; lane 0 is this one): no array of it is another lane's."""
        return self if index == 0 else self.child(("lane", index))

    def get(self, name: str, shape: Sequence[int], dtype: np.dtype | type,
            fill: float | None = None) -> np.ndarray:
        shape = tuple(int(n) for n in shape)
        array = self._arrays.get(name)
        if array is None or array.shape != shape or array.dtype != np.dtype(dtype):
            array = np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)
            self._arrays[name] = array
        return array

    def nhwc(self, name: str, n: int, spatial: Sequence[int], channels: int,
             dtype: np.dtype | type, channels_last: bool) -> np.ndarray:
        """A zero-bordered array with logical axes ``(n, *spatial, channels)`` (see module doc)."""
        if channels_last:
            return self.get(name, (n, *spatial, channels), dtype, fill=0)
        return np.moveaxis(self.get(name, (channels, n, *spatial), dtype, fill=0), 0, -1)


def nhwc_buffer(n: int, spatial: Sequence[int], channels: int, dtype: np.dtype | type,
                channels_last: bool) -> np.ndarray:
    """A zeroed array with logical axes ``(n, *spatial, channels)``, stored channel-innermost
    when ``channels_last``, else as ``(channels, n, *spatial)`` seen through a transposed view."""
    return Workspace().nhwc("buffer", n, spatial, channels, dtype, channels_last)


# -- im2col / col2im -----------------------------------------------------------------------------
def pad_to_nhwc(x: np.ndarray, pad: Sequence[int], out: np.ndarray) -> None:
    """Copy ``x`` (N, C, *spatial) into the interior of the logical-NHWC ``out``, which has
    ``pad`` extra cells before and after each spatial axis; the border is left as it is."""
    interior = tuple(slice(p, p + s) for p, s in zip(pad, x.shape[2:], strict=True))
    batch_copyto(out[(slice(None), *interior, slice(None))], np.moveaxis(x, 1, -1))


def sliding_windows(xp: np.ndarray, kernel: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int], out_size: Sequence[int]) -> np.ndarray:
    """A read-only view ``(N, *out_size, *kernel, C)`` of every window of a logical-NHWC array."""
    strides = xp.strides
    spatial = strides[1:-1]
    shape = (xp.shape[0], *out_size, *kernel, xp.shape[-1])
    view_strides = (strides[0],
                    *(st * s for st, s in zip(spatial, stride, strict=True)),
                    *(st * d for st, d in zip(spatial, dilation, strict=True)),
                    strides[-1])
    return as_strided(xp, shape, view_strides, writeable=False)


def im2col_nhwc(xp: np.ndarray, kernel: Sequence[int], stride: Sequence[int],
                dilation: Sequence[int], out_size: Sequence[int],
                out: np.ndarray | None = None) -> np.ndarray:
    """The columns ``(N, *out_size, *kernel, C)`` of a padded logical-NHWC array.

    Reshaped to ``(N * prod(out_size), prod(kernel) * C)`` it is the im2col matrix with columns
    ordered (kernel offset..., channel). Written into ``out`` (any storage order) when given.
    """
    windows = sliding_windows(xp, kernel, stride, dilation, out_size)
    if out is None:
        out = np.empty(windows.shape, xp.dtype)
    batch_copyto(out, windows)
    return out


def col2im_add(dcol: np.ndarray, dxp: np.ndarray, stride: Sequence[int],
               dilation: Sequence[int]) -> None:
    """Accumulate columns ``(N, *out_size, *kernel, C)`` into the padded logical-NHWC ``dxp``:
    one strided add per kernel offset (within an offset the cells are distinct)."""
    n_spatial = dxp.ndim - 2
    kernel = dcol.shape[1 + n_spatial:1 + 2 * n_spatial]
    lead = (slice(None),) * (1 + n_spatial)
    for offset in kernel_offsets(kernel):
        add_at_offset(dxp, dcol[(*lead, *offset)], offset, stride, dilation)


def add_at_offset(dxp: np.ndarray, values: np.ndarray, offset: Sequence[int],
                  stride: Sequence[int], dilation: Sequence[int]) -> None:
    """``dxp[cells kernel offset meets] += values``; ``values`` is ``(N, *out_size, C)``."""
    cells = offset_slices(offset, stride, values.shape[1:-1], dilation)
    target = dxp[(slice(None), *cells, slice(None))]
    np.add(target, values, out=target)


# -- convolution ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, stride, pad and dilation per spatial axis, and the number of channel groups."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dilation: tuple[int, ...]
    group: int = 1

    def out_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        return tuple(conv_out_size(*args) for args in zip(
            spatial, self.kernel, self.pad, self.stride, self.dilation, strict=True))

    def padded(self, spatial: Sequence[int]) -> tuple[int, ...]:
        return tuple(n + 2 * p for n, p in zip(spatial, self.pad, strict=True))

    def channels_last(self, channels: int, out_width: int) -> bool:
        """Store im2col's input channel-innermost? Its copy then moves runs of kernel_w * C/G
        values (C/G if dilated); channel-outermost, runs of one output row (one value if
        strided). The longer runs win (measured crossovers: C=3-4 at 16x16, C=8 at 32x32)."""
        last = channels // self.group * (self.kernel[-1] if self.dilation[-1] == 1 else 1)
        first = out_width if self.stride[-1] == 1 else 1
        return last >= first


def weight_matrix(weight: np.ndarray, group: int) -> np.ndarray:
    """Weights (O, C/G, *kernel) as (G, O/G, prod(kernel) * C/G), columns in im2col order."""
    return np.moveaxis(weight, 1, -1).reshape(group, weight.shape[0] // group, -1)


def conv_columns(x: np.ndarray, geom: ConvGeometry, ws: Workspace) -> np.ndarray:
    """im2col of a batch ``x`` (N, C, *spatial): the matrices (G, N*prod(out), prod(k)*C/G),
    built in ``ws`` from one padded logical-NHWC copy."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    out, group, cg = geom.out_size(spatial), geom.group, c // geom.group
    channels_last = geom.channels_last(c, out[-1])
    xp = ws.nhwc("padded", n, geom.padded(spatial), c, x.dtype, channels_last)
    pad_to_nhwc(x, geom.pad, xp)
    m, kg = n * math.prod(out), math.prod(geom.kernel) * cg
    if channels_last:
        store = ws.get("columns", (group, n, *out, *geom.kernel, cg), x.dtype)
        windows, matrix = store, store.reshape(group, m, kg)
    else:  # stored (G, *kernel, C/G, N, *out): each column-matrix row is a shifted image
        store = ws.get("columns", (group, *geom.kernel, cg, n, *out), x.dtype)
        nk = len(geom.kernel) + 1
        windows = store.transpose(0, *range(nk + 1, store.ndim), *range(1, nk + 1))
        matrix = store.reshape(group, kg, m).transpose(0, 2, 1)
    for g in range(group):
        im2col_nhwc(xp[..., g * cg:(g + 1) * cg], geom.kernel, geom.stride, geom.dilation, out,
                    out=windows[g])
    return matrix


def _channels_last(matrix: np.ndarray) -> bool:
    """Whether ``conv_columns`` stored these column matrices channel-innermost (row-major)."""
    return matrix.strides[-1] == matrix.itemsize


def conv_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                 geom: ConvGeometry, ws: Workspace, out: np.ndarray,
                 w: np.ndarray | None = None) -> np.ndarray:
    """``out`` (N, O, *out) = convolution of ``x`` (N, C, *spatial): im2col of the whole ``x``
    (callers pass a batch block), then per group one GEMM (channel-last columns) or one stacked
    per-sample matmul (channel-first). Returns the column matrices (kept in ``ws``) for
    ``conv_backward_params``. ``w``: ``weight_matrix(weight, geom.group)``, if already built."""
    matrix = conv_columns(x, geom, ws)
    w = weight_matrix(weight, geom.group) if w is None else w
    n, o, og = x.shape[0], weight.shape[0], weight.shape[0] // geom.group
    m = matrix.shape[1]
    if not _channels_last(matrix):
        # Channel-first columns: per-sample GEMMs (one stacked matmul) write each sample's
        # (O, P) straight into ``out``, no (O, N*P) product to transpose and no buffer for it
        # (single-thread CPU ms, same values: CIFAR10-quick conv1 25-image block 3.5 -> 3.0,
        # LeNet conv1 1.7 -> 1.2). Channel-last columns lost that way (conv2 2.4 -> 3.1).
        out3 = out.reshape(n, o, -1)
        for g in range(geom.group):
            columns = matrix[g].T.reshape(-1, n, m // n).transpose(1, 0, 2)  # (N, K, P)
            np.matmul(w[g], columns, out=out3[:, g * og:(g + 1) * og])
        if bias is not None:
            column = bias[:, None]
            for_batch_chunks(lambda a, b: np.add(out3[a:b], column, out=out3[a:b]), n,
                             out3[0].size)
        return matrix
    y = ws.get("y", (m, o), x.dtype)  # the orientation OpenBLAS runs fastest on this layout
    for g in range(geom.group):
        np.matmul(matrix[g], w[g].T, out=y[:, g * og:(g + 1) * og])
    y = y.reshape(n, -1, o).transpose(0, 2, 1)
    out = out.reshape(y.shape)
    if bias is None:
        batch_copyto(out, y)
    else:
        column = bias[:, None]
        for_batch_chunks(lambda a, b: np.add(y[a:b], column, out=out[a:b]), n, out[0].size)
    return matrix


# Convolution works on blocks of the batch whose column matrices take about this many bytes:
# they stay in cache between the im2col copy and the GEMMs that read them (CIFAR10-quick's conv2
# builds 82 MB of columns over a batch of 100), and the blocks run side by side, one per thread,
# each with a one-thread BLAS (parallel.for_each_block), in training too: backward builds a
# block's columns again. Each thread lane has its own buffers, so peak memory grows with the
# block. Two threads, interleaved fresh processes (a loaded 2 vCPU Xeon, 2 MB L2 per core),
# training iteration median ms / peak RSS MB:
#   CIFAR10-quick b100: 2 MB blocks 138 / 138, 4 MB 106-122 / 145, 6 MB 117-121 / 153,
#     8 MB 94-120 / 163, 12 MB 93 / 202, 16 MB 96 / 214; the whole batch's columns kept for
#     backward with two-thread BLAS GEMMs (before) 100-122 / 356-365 in the same runs;
#     one thread: 4 / 6 / 8 MB 178 / 171 / 169 ms, before 213 ms.
#   AlexNet b10 fwd+bwd: 6 MB 614 / 767, 8 MB 569 / 771 (its conv3-5 have large weights and
#     small images: more blocks cost weight-sized passes); before 555 / 1047.
#   LeNet b64 (one block per layer at 8 MB, columns kept): 6 MB 22.9 / 112, 8 MB 25.0 / 119.
CONV_BLOCK_BYTES = 8 << 20


def conv_blocks(n: int, item_bytes: int, block_bytes: int | None = None) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges covering ``range(n)``, each about ``block_bytes``
    of per-item work (at most; at least one item), of near-equal lengths (at most two lengths).
    More than one block: an even count, so that two threads get equal shares (CIFAR10-quick's
    conv3 in three 34-image blocks left one thread idle a third of the time). Not the thread
    count itself: the blocks fix the order of the weight gradient's sum, which must not depend
    on it."""
    budget = CONV_BLOCK_BYTES if block_bytes is None else block_bytes
    per_block = max(1, min(n, budget // max(1, item_bytes)))
    count = -(-n // per_block)
    if count > 1:
        count = min(n, count + count % 2)
    bounds = [n * i // count for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


def column_bytes(x: np.ndarray, geom: ConvGeometry) -> int:
    """Bytes of one batch item's im2col columns."""
    out = geom.out_size(x.shape[2:])
    return math.prod(out) * math.prod(geom.kernel) * x.shape[1] * x.itemsize


def conv_forward_blocked(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                         geom: ConvGeometry, ws: Workspace, out: np.ndarray,
                         block_bytes: int | None = None) -> None:
    """``conv_forward`` over blocks of the batch (``conv_blocks``), each block's columns built,
    multiplied and written out (the bias added in that same pass) while they are in cache;
    several blocks run side by side, one thread each (``parallel.for_each_block``). When the
    batch is one block, its columns stay in ``ws`` for
    ``conv_backward_blocked(..., columns_kept=True)``. ``block_bytes``: the block budget
    (default ``CONV_BLOCK_BYTES``)."""
    blocks = conv_blocks(x.shape[0], column_bytes(x, geom), block_bytes)
    if len(blocks) == 1:
        work = ws.child(x.shape[0])
        work.kept = conv_forward(x, weight, bias, geom, work, out)
        return

    w = weight_matrix(weight, geom.group)  # a copy of the weight: once, not per block

    def run(lane: int, first: int, stop: int) -> None:
        for start, end in blocks[first:stop]:
            conv_forward(x[start:end], weight, bias, geom, ws.lane(lane).child(end - start),
                         out[start:end], w)
    for_each_block(run, len(blocks))


def conv_backward_blocked(dy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                          geom: ConvGeometry, ws: Workspace, weight_diff: np.ndarray | None,
                          bias_diff: np.ndarray | None, dx: np.ndarray | None,
                          columns_kept: bool = False, block_bytes: int | None = None) -> None:
    """Backward of ``conv_forward_blocked``: per block of the batch, its columns again (cheap
    while cached, and no batch-sized matrix is kept from the forward), the parameter gradients
    accumulated (+=) and the input gradient written; any of the three may be None. With
    ``columns_kept`` (the caller knows that the forward on this same ``x`` was one block and
    ``ws`` has built nothing since), that forward's columns are used as they are.

    Block ``i`` runs on thread lane ``i % lanes``. A block whose turn has not come (the blocks
    before it not yet added) computes its parameter gradients into its lane's own buffers and
    adds them once the block before it has, so the sums are those of one thread going block
    after block, whatever the thread count."""
    if weight_diff is None and bias_diff is None and dx is None:
        return
    blocks = conv_blocks(x.shape[0], column_bytes(x, geom), block_bytes)
    if len(blocks) == 1:
        work = ws.child(x.shape[0])
        kept = work.kept if columns_kept else None
        _conv_backward_block(dy, x, weight, geom, work, weight_diff, bias_diff, dx, kept)
        return
    w_rows = None if dx is None else data_weight_rows(weight, geom)  # once, not per block
    lanes = min(num_threads(), len(blocks))
    order = threading.Condition()
    added = [0]  # blocks whose parameter gradients are in weight_diff and bias_diff
    failed = [False]  # a block raised: the others stop instead of waiting for its turn

    def run(_worker: int, first: int, stop: int) -> None:
        for i in range(len(blocks)):
            if not first <= i % lanes < stop:
                continue
            try:
                step(i)
            except BaseException:
                with order:
                    failed[0] = True
                    order.notify_all()
                raise
            if failed[0]:
                return

    def step(i: int) -> None:
        start, end = blocks[i]
        work = ws.lane(i % lanes)
        with order:
            own = added[0] == i  # its turn already: add straight in
        totals = diffs = (weight_diff, bias_diff)
        if not own:  # into the lane's buffers, added below in block order
            diffs = tuple(None if d is None else work.get(name, d.shape, d.dtype)
                          for name, d in zip(("weight_diff", "bias_diff"), totals, strict=True))
            for d in diffs:
                if d is not None:
                    d.fill(0)
        _conv_backward_block(dy[start:end], x[start:end], weight, geom, work.child(end - start),
                             *diffs, None if dx is None else dx[start:end], None, w_rows)
        with order:
            order.wait_for(lambda: added[0] == i or failed[0])
            if failed[0]:
                return
            if not own:
                for total, part in zip(totals, diffs, strict=True):
                    if part is not None:
                        total += part
            added[0] += 1
            order.notify_all()
    for_each_block(run, lanes)


def _conv_backward_block(dy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                         geom: ConvGeometry, ws: Workspace, weight_diff: np.ndarray | None,
                         bias_diff: np.ndarray | None, dx: np.ndarray | None,
                         matrix: np.ndarray | None, w_rows: np.ndarray | None = None) -> None:
    """One block's backward; ``matrix``: its forward's columns, if kept (else built here);
    ``w_rows``: ``data_weight_rows``, if built."""
    if weight_diff is not None:
        matrix = matrix if matrix is not None else conv_columns(x, geom, ws)
        conv_backward_params(dy, matrix, geom, ws, weight_diff, bias_diff)
    elif bias_diff is not None:
        bias_diff += dy.sum(axis=(0, *range(2, dy.ndim)))
    if dx is not None:
        conv_backward_data(dy, weight, geom, ws, dx, w_rows)


# A weight gradient whose output is small against its inner dimension (O/G * K at most
# DW_OUTPUT_RATIO * N*P) is summed from per-block products that Moka's threads compute side by
# side, each GEMM on one BLAS thread: OpenBLAS's threads meet once per inner block of a GEMM, so
# a small output over a long inner dimension ran up to ~3x slower on two BLAS threads than on
# one, and 10-80x slower while another process held a core. A block is one sample (its dy is
# the (O, P) matrix as it is) when P >= DW_SAMPLE_INNER, else consecutive samples (dy copied
# transposed per block) with an inner dimension of about DW_BLOCK_INNER. Wall ms on two
# threads, interleaved medians, one GEMM vs blocks: LeNet conv1 1.61 vs 0.59, CIFAR10-quick
# conv1 7.2 vs 5.5 (a 25-image block 1.9 vs 1.4), AlexNet conv1 11.3 vs 10.1; quiet machine,
# one GEMM vs 16-sample blocks: LeNet conv2 1.43 vs 1.32, CIFAR10-quick conv2 10.7 vs 10.4,
# conv3 3.4 vs 3.7 (under load 80 vs 2.3, 460 vs 22, 120 vs 7). AlexNet conv2-5 (outputs
# 20-500x their N*P) keep the one GEMM.
DW_OUTPUT_RATIO = 8
DW_SAMPLE_INNER = 512
DW_BLOCK_INNER = 1024


def _dw_blocks(n: int, p: int, out_size: int) -> int:
    """How many blocks of samples the weight gradient is summed from (``n``: one sample each),
    or 0 for one GEMM over the batch."""
    if out_size > DW_OUTPUT_RATIO * n * p:
        return 0
    count = n if p >= DW_SAMPLE_INNER else min(n, n * p // DW_BLOCK_INNER)
    return count if count >= 2 else 0


def conv_backward_params(dy: np.ndarray, matrix: np.ndarray, geom: ConvGeometry,
                         ws: Workspace, weight_diff: np.ndarray | None,
                         bias_diff: np.ndarray | None) -> None:
    """Accumulate (+=) the weight and bias gradients given ``dy`` (N, O, *out) and the column
    matrices of the forward input; either diff may be None (not wanted)."""
    n, o, p = dy.shape[0], dy.shape[1], math.prod(dy.shape[2:])
    group, og = geom.group, o // geom.group
    count = _dw_blocks(n, p, og * matrix.shape[2])
    if count:
        dw, db = _params_by_blocks(dy.reshape(n, o, p), matrix, group, count, ws,
                                   weight_diff is not None, bias_diff is not None)
    else:
        dw, db = _params_one_gemm(dy.reshape(n, o, p), matrix, group, ws,
                                  weight_diff is not None, bias_diff is not None)
    if bias_diff is not None:
        bias_diff += db
    if weight_diff is not None:
        weight_diff += np.moveaxis(dw.reshape(o, *geom.kernel, -1), -1, 1)


def _params_one_gemm(dy: np.ndarray, matrix: np.ndarray, group: int, ws: Workspace,
                     weights: bool, bias: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(O, K) weight and (O,) bias gradients of ``dy`` (N, O, P): one GEMM over the batch, which
    reads channel-first columns (K, N*P) as a transposed matrix."""
    n, o, p = dy.shape
    og = o // group
    dyt = ws.get("dy_t", (o, n, p), dy.dtype)  # one GEMM over the batch needs dy as (O, N*P)
    batch_copyto(dyt.transpose(1, 0, 2), dy)
    dyt = dyt.reshape(o, -1)
    db = dyt @ ws.get("ones", (n * p,), dy.dtype, fill=1) if bias else None  # GEMV, as Caffe
    dw = None
    if weights:
        dw = np.empty((o, matrix.shape[2]), dy.dtype)
        for g in range(group):
            np.matmul(dyt[g * og:(g + 1) * og], matrix[g], out=dw[g * og:(g + 1) * og])
    return dw, db


def _params_by_blocks(dy: np.ndarray, matrix: np.ndarray, group: int, count: int,
                      ws: Workspace, weights: bool,
                      bias: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``_params_one_gemm``'s gradients as sums of the products over ``count`` blocks of
    consecutive samples (lengths within one of each other), in block order: the same for every
    thread count."""
    n, o, p = dy.shape
    og, k = o // group, matrix.shape[2]
    bounds = [n * j // count for j in range(count + 1)]
    longest = -(-n // count)
    parts = ws.get("dw_parts", (count, o, k), dy.dtype)
    bias_parts = ws.get("db_parts", (count, o), dy.dtype)
    ones = ws.get("ones_block", (longest * p,), dy.dtype, fill=1)
    columns = matrix.reshape(group, n, p, k)  # a view for both layouts

    def products(rows: np.ndarray, first: int, last: int, out: slice | int) -> None:
        """Block products of ``rows`` (..., O, L) and samples first..last-1 into ``out``."""
        if weights:
            for g in range(group):
                cols = columns[g, first:last]
                cols = cols if rows.ndim == 3 else cols.reshape(-1, k)
                np.matmul(rows[..., g * og:(g + 1) * og, :], cols,
                          out=parts[out, g * og:(g + 1) * og])
        if bias:
            np.matmul(rows, ones[:rows.shape[-1]], out=bias_parts[out])

    def work(worker: int, start: int, stop: int) -> None:
        if count == n:  # dy's samples are the blocks' (O, P) matrices as they are
            products(dy[start:stop], start, stop, slice(start, stop))
            return
        scratch = ws.lane(worker).get("dy_block", (o * longest * p,), dy.dtype)
        for j in range(start, stop):
            first, last = bounds[j], bounds[j + 1]
            rows = scratch[:o * (last - first) * p].reshape(o, last - first, p)
            np.copyto(rows.transpose(1, 0, 2), dy[first:last])
            products(rows.reshape(o, -1), first, last, j)

    for_each_block(work, count, n * p * (o + k) // count)
    return (parts.sum(axis=0) if weights else None,
            bias_parts.sum(axis=0) if bias else None)


def _dy_rows(dy: np.ndarray, geom: ConvGeometry, ws: Workspace, width: int) -> np.ndarray:
    """For each group, the (N * prod(out[:-1]) * width, kernel[-1] * O/G) matrix whose row
    (n, ..., w) holds the dy values that input column ``w`` meets along the last axis."""
    n, o, out = dy.shape[0], dy.shape[1], dy.shape[2:]
    k, s, p, d = geom.kernel[-1], geom.stride[-1], geom.pad[-1], geom.dilation[-1]
    og, ext = o // geom.group, d * (k - 1)
    # dy along the last axis at ext + stride*j, zeros elsewhere; wide enough for every tap.
    wq = max((out[-1] - 1) * s + 1 + 2 * ext, width + p + ext)
    dyq = ws.get("dy_stuffed", (n, *out[:-1], wq, o), dy.dtype, fill=0)
    batch_copyto(dyq[..., ext:ext + (out[-1] - 1) * s + 1:s, :], np.moveaxis(dy, 1, -1))
    rows_shape = (n, *out[:-1], width, k, og)
    rows = ws.get("dy_rows", (geom.group, *rows_shape), dy.dtype)
    st = dyq.strides
    for g in range(geom.group):
        taps = as_strided(dyq[..., p:, g * og:(g + 1) * og], rows_shape,
                          (*st[:-1], st[-2] * d, st[-1]), writeable=False)
        batch_copyto(rows[g], taps)
    return rows.reshape(geom.group, -1, k * og)


def data_weight_rows(weight: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """The weights as ``conv_backward_data`` multiplies them, (G, kernel[-1] * O/G,
    prod(kernel[:-1]) * C/G): ``[g][(j', o), (t, c)] = weight[o, c, *offset_t, k-1-j']`` (the
    last kernel axis flipped). A strided gather of the whole weight (AlexNet's conv3: ~10 ms),
    so blocked callers build it once per backward."""
    o, cg, k, group = weight.shape[0], weight.shape[1], geom.kernel, geom.group
    w = np.moveaxis(weight.reshape(group, o // group, cg, *k)[..., ::-1], (1, 2), (-2, -1))
    taps = math.prod(k[:-1])
    return np.moveaxis(w.reshape(group, taps, k[-1] * (o // group), cg), 1, 2).reshape(
        group, -1, taps * cg)


def conv_backward_data(dy: np.ndarray, weight: np.ndarray, geom: ConvGeometry, ws: Workspace,
                       dx: np.ndarray, w_rows: np.ndarray | None = None) -> None:
    """Write ``dx`` (N, C, *spatial), the input gradient given ``dy`` (N, O, *out).

    A transposed convolution. Along the last spatial axis ``dy`` is zero-stuffed by the stride
    and gathered over the (flipped) kernel, so one GEMM per group yields, for every offset of
    the *other* kernel axes, whole rows of the input gradient; each is added in with one strided
    add. This does ``prod(kernel[:-1])`` adds where col2im does ``prod(kernel)``, and never holds
    the column gradient (measured 1.7-2x faster than a GEMM and an add per kernel offset; one
    GEMM for all offsets rather than one per offset: 1.3x faster on CIFAR's conv2).
    ``w_rows``: ``data_weight_rows(weight, geom)``, if already built.
    """
    n, out = dy.shape[0], dy.shape[2:]
    c, spatial = dx.shape[1], dx.shape[2:]
    k, s, p, d = geom.kernel, geom.stride, geom.pad, geom.dilation
    group, cg = geom.group, c // geom.group
    rows = _dy_rows(dy, geom, ws, spatial[-1])
    w_rows = data_weight_rows(weight, geom) if w_rows is None else w_rows
    taps = math.prod(k[:-1])
    lead_padded = tuple(ni + 2 * pi for ni, pi in zip(spatial[:-1], p[:-1], strict=True))
    dxp = ws.get("dx_padded", (n, *lead_padded, spatial[-1], c), dy.dtype)
    batch_fill(dxp, 0)
    product = ws.get("dx_rows", (rows.shape[1], taps * cg), dy.dtype)
    row_shape = (n, *out[:-1], spatial[-1], cg)
    for g in range(group):
        np.matmul(rows[g], w_rows[g], out=product)
        for t, offset in enumerate(kernel_offsets(k[:-1])):
            cells = offset_slices(offset, s[:-1], out[:-1], d[:-1])
            target = dxp[(slice(None), *cells, slice(None), slice(g * cg, (g + 1) * cg))]
            batch_add(target, product[:, t * cg:(t + 1) * cg].reshape(row_shape))
    interior = tuple(slice(pi, pi + ni) for pi, ni in zip(p[:-1], spatial[:-1], strict=True))
    batch_copyto(dx, np.moveaxis(dxp[(slice(None), *interior)], -1, 1))


# -- pooling ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolAxis:
    """One spatial axis of a pooling: input size, kernel, stride, pad and output size."""

    size: int
    kernel: int
    stride: int
    pad: int
    out: int

    @property
    def phases(self) -> int:
        """How many phase planes windows read (phases at or past the kernel are skipped)."""
        return min(self.stride, self.kernel)

    @property
    def plane_len(self) -> int:
        return self.out + (self.kernel - 1) // self.stride

    def starts(self) -> np.ndarray:
        """Each window's first cell before clipping (Caffe's ``hstart``; may be negative)."""
        return np.arange(self.out) * self.stride - self.pad

    def window_matrix(self) -> np.ndarray:
        """(out, size) with a 1 where input cell ``i`` lies in window ``o`` (clipped to the
        input), else 0."""
        cells = np.arange(self.size)
        starts = self.starts()[:, None]
        return ((cells >= starts) & (cells < starts + self.kernel)).astype(np.float64)

    def plane_cells(self, phase: int) -> tuple[slice, slice] | None:
        """(plane positions, input cells) of ``phase`` that lie inside the input, or None.

        Plane position ``u`` of phase ``a`` is padded cell ``a + stride*u``.
        """
        s = self.stride
        lo = max(0, -((phase - self.pad) // s))
        hi = min(self.plane_len, (self.size - 1 + self.pad - phase) // s + 1)
        if hi <= lo:
            return None
        first = phase + s * lo - self.pad
        return slice(lo, hi), slice(first, first + s * (hi - lo - 1) + 1, s)


@dataclass(frozen=True)
class PhasePlanes:
    """Phase planes of ``lead``-shaped stacks of 2-d (or n-d) maps, pooled along ``axes``.

    The buffer holds, per phase, every map's plane flattened into one run, plus slack. A window
    offset is then a *flat shift* of its phase's run, so each offset's view is one contiguous
    1-d array (numpy's fastest loop) of the *wide* shape ``(*lead, *plane_len)``: the real
    outputs are its leading ``out`` cells per axis (``narrow``); the rest is scratch.
    """

    lead: tuple[int, ...]
    axes: tuple[PoolAxis, ...]

    @property
    def wide_shape(self) -> tuple[int, ...]:
        return (*self.lead, *(a.plane_len for a in self.axes))

    @property
    def shape(self) -> tuple[int, ...]:
        """The buffer: (*phases, wide cells + slack for the largest shift)."""
        return (*(a.phases for a in self.axes), math.prod(self.wide_shape) + self._shift(
            [a.kernel - 1 for a in self.axes]))

    def _shift(self, offset: Sequence[int]) -> int:
        shift, row = 0, 1
        for o, a in zip(reversed(offset), reversed(self.axes), strict=True):
            shift += (o // a.stride) * row
            row *= a.plane_len
        return shift

    def narrow(self, wide: np.ndarray) -> np.ndarray:
        """The real outputs of a wide array."""
        return wide[(Ellipsis, *(slice(0, a.out) for a in self.axes))]

    def grid(self, planes: np.ndarray) -> np.ndarray:
        """The planes as (*phases, *lead, *plane_len), without the slack."""
        phases = planes.shape[:len(self.axes)]
        return planes[..., :math.prod(self.wide_shape)].reshape(*phases, *self.wide_shape)

    def view(self, planes: np.ndarray, offset: Sequence[int]) -> np.ndarray:
        """For every window, its cell at kernel ``offset``: a contiguous wide-shaped view."""
        phase = tuple(o % a.stride for o, a in zip(offset, self.axes, strict=True))
        start = self._shift(offset)
        return planes[phase][start:start + math.prod(self.wide_shape)].reshape(self.wide_shape)

    def _pairs(self) -> Iterator[tuple[tuple[int, ...], tuple, tuple]]:
        """(phase, plane slices, input slices) for every phase with cells inside the input."""
        for phase in itertools.product(*(range(a.phases) for a in self.axes)):
            cells = [a.plane_cells(ph) for a, ph in zip(self.axes, phase, strict=True)]
            if all(cells):
                yield phase, tuple(c[0] for c in cells), tuple(c[1] for c in cells)

    def load(self, x: np.ndarray, planes: np.ndarray) -> None:
        """Copy the input ``x`` (*lead, *spatial) into its plane cells; the other cells
        (padding, ceil overhang, scratch) keep what they hold."""
        for target, input_slices in self.load_targets(planes):
            np.copyto(target, x[input_slices])

    def load_targets(self, planes: np.ndarray) -> list[tuple[np.ndarray, tuple]]:
        """``load`` as (view of plane cells, index of the input cells) pairs, to keep and
        reuse: building them costs more than copying a small block."""
        grid, lead = self.grid(planes), (slice(None),) * len(self.lead)
        return [(grid[(*phase, *lead, *plane_slices)], (*lead, *input_slices))
                for phase, plane_slices, input_slices in self._pairs()]

    def store(self, planes: np.ndarray, x: np.ndarray) -> None:
        """The inverse of ``load``: write the plane cells that are input cells into ``x``
        (input cells that no phase holds, when stride > kernel, are not written)."""
        grid, lead = self.grid(planes), (slice(None),) * len(self.lead)
        for phase, plane_slices, input_slices in self._pairs():
            np.copyto(x[(*lead, *input_slices)], grid[(*phase, *lead, *plane_slices)])

    def covers_input(self) -> bool:
        """Whether every input cell lies in some phase plane (``store`` writes all of ``x``)."""
        return all(sum(c[0].stop - c[0].start for c in map(a.plane_cells, range(a.phases))
                       if c is not None) == a.size for a in self.axes)
