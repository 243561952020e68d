"""Pooling: prototxt type ``Pooling``, configured by ``pooling_param`` (PoolingParameter: ``pool``
MAX | AVE | STOCHASTIC, ``kernel_size``/``kernel_h``/``kernel_w``, ``stride``/``stride_h``/
``stride_w``, ``pad``/``pad_h``/``pad_w``, ``global_pooling``, ``round_mode`` CEIL | FLOOR, and
the forks' ``ceil_mode`` true | false, the same choice spelt as BVLC pull request 3057 does)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.kernels import PhasePlanes, PoolAxis, Workspace, pool_out_size
from engine.layer import TRAIN, Layer, register_layer
from engine.parallel import for_batch_blocks

MAX, AVE, STOCHASTIC = 0, 1, 2  # PoolingParameter.PoolMethod
CEIL = 0  # PoolingParameter.RoundMode
FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)
# AVE pooling of planes up to this many cells is one GEMM against a 0/1 window matrix: 4-8x
# faster than summing shifted views at 8x8 and 16x16, still faster at 32x32 (measured).
AVE_GEMM_MAX_CELLS = 32 * 32
# MAX pooling runs on blocks of about this many input cells, whose phase planes and running max
# stay in a core's cache (CIFAR10-quick's pool1 forward 12 -> 8 ms on one thread, measured).
POOL_BLOCK_WORK = 1 << 18


@register_layer
class Pooling(Layer):
    """Max, average or stochastic pooling over each (n, c) plane.

    Shapes: bottom (N, C, H, W) -> top (N, C, PH, PW) with ``PH = ceil((H + 2*pad - k) / stride)
    + 1`` (floor under ``round_mode: FLOOR`` or the forks' ``ceil_mode: false``), less one
    when ``pad > 0`` and the last window would start in the padding (Caffe's clip rule). MAX
    may have a second top: the argmax as Caffe's flat index ``h * W + w`` into the input plane,
    stored as a float (-1 for a window with no cell), and the gradient goes to that cell only.

    Caffe quirks matched: windows are clipped to the image, so padding never wins a MAX; ties go
    to the first maximum in row-major window order (strict ``>`` from -FLT_MAX). AVE sums the
    in-image cells and divides by ``(min(hs+k, H+pad) - hs) * (min(ws+k, W+pad) - ws)``,
    ``hs = ph*stride - pad``: padding counts, the ceil overhang does not. STOCHASTIC (GPU-only in
    Caffe, same rules here; inputs are assumed non-negative, e.g. after ReLU): TRAIN picks a cell
    with probability proportional to its value, TEST outputs ``sum(x^2) / (FLT_MIN + sum(x))``,
    whose exact gradient TEST backward gives.
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False

    n_bottom = (1, 1)
    n_top = (1, 2)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.pooling_param
        self.method, self.global_pooling = p.pool, p.global_pooling
        self.round_up = self._round_up(p)
        self.kernel = self._kernel(p)
        self.stride = self._pair(p, "stride", 1)
        self.pad = self._pair(p, "pad", 0)
        if min(self.stride) < 1:
            raise self.error(f"stride must be positive; got {self.stride}")
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.error(f"global_pooling needs pad 0 and stride 1; got pad {self.pad}, "
                             f"stride {self.stride}")
        if self.pad != (0, 0):
            if self.method not in (MAX, AVE):
                raise self.error("padding is implemented only for MAX and AVE pooling")
            if self.kernel and not (self.pad[0] < self.kernel[0] and self.pad[1] < self.kernel[1]):
                raise self.error(f"pad {self.pad} must be smaller than the kernel {self.kernel}")
        if len(top) > 1 and self.method != MAX:
            raise self.error("only MAX pooling has a second top (the argmax mask)")
        self._work = Workspace()
        self._shape_key: tuple = ()

    def _round_up(self, p) -> bool:
        if not p.HasField("ceil_mode"):
            return p.round_mode == CEIL
        if p.HasField("round_mode") and (p.round_mode == CEIL) != p.ceil_mode:
            raise self.error(f"ceil_mode: {str(p.ceil_mode).lower()} contradicts round_mode: "
                             f"{'CEIL' if p.round_mode == CEIL else 'FLOOR'}; give one of them")
        return bool(p.ceil_mode)

    def _kernel(self, p) -> tuple[int, int] | None:
        given = [f for f in ("kernel_size", "kernel_h", "kernel_w") if p.HasField(f)]
        if self.global_pooling:
            if given:
                raise self.error(f"global_pooling takes the kernel from the bottom; do not give "
                                 f"{', '.join(given)}")
            return None
        if p.HasField("kernel_size") and len(given) > 1:
            raise self.error("give either kernel_size or kernel_h and kernel_w, not both")
        if not p.HasField("kernel_size") and len(given) != 2:
            raise self.error("kernel_size, or both kernel_h and kernel_w, is required")
        kernel = ((p.kernel_size,) * 2 if p.HasField("kernel_size")
                  else (p.kernel_h, p.kernel_w))
        if min(kernel) < 1:
            raise self.error(f"kernel dimensions must be positive; got {kernel}")
        return kernel

    def _pair(self, p, name: str, default: int) -> tuple[int, int]:
        h, w = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
        if p.HasField(name) and (h or w):
            raise self.error(f"give either {name} or {name}_h and {name}_w, not both")
        if h != w:
            raise self.error(f"{name}_h and {name}_w must be given together")
        if h:
            return getattr(p, f"{name}_h"), getattr(p, f"{name}_w")
        return (getattr(p, name),) * 2 if p.HasField(name) else (default, default)

    # -- shapes ----------------------------------------------------------------------------------
    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"the bottom must have 4 axes (num, channels, height, width); got "
                             f"shape {shape}")
        kernel = shape[2:] if self.global_pooling else self.kernel
        out = tuple(pool_out_size(n, k, p, s, self.round_up) for n, k, p, s in
                    zip(shape[2:], kernel, self.pad, self.stride, strict=True))
        if min(out) < 1:
            raise self.error(f"the kernel {kernel} does not fit the input {shape[2:]} with pad "
                             f"{self.pad}")
        for blob in top:
            blob.reshape((*shape[:2], *out))
        key = (shape, bottom[0].dtype, tuple(kernel))
        if key != self._shape_key:
            self._shape_key = key
            self._set_geometry(shape, kernel, out, bottom[0].dtype)

    def _set_geometry(self, shape: tuple[int, ...], kernel: Sequence[int],
                      out: tuple[int, ...], dtype: np.dtype) -> None:
        """Everything that depends only on the shapes, computed once per bottom shape."""
        axes = tuple(_trimmed(PoolAxis(n, k, s, p, o), self.method) for n, k, s, p, o in
                     zip(shape[2:], kernel, self.stride, self.pad, out, strict=True))
        self.planes = PhasePlanes(shape[:2], axes)
        # Offsets that no window ever meets inside the input read only padding: skipping them
        # changes no result (the order of the others is kept).
        reach = [range(max(0, a.pad - (a.out - 1) * a.stride), min(a.kernel, a.pad + a.size))
                 for a in axes]
        self.offsets = list(itertools.product(*reach))  # row-major, as kernel_offsets
        # the whole input is one window: reductions beat a loop over kernel offsets
        self.whole = out == (1, 1) and self.pad == (0, 0) and \
            kernel[0] >= shape[2] and kernel[1] >= shape[3]
        ah, aw = axes
        hs, ws = ah.starts(), aw.starts()
        size_h = np.minimum(hs + ah.kernel, ah.size + ah.pad) - hs
        size_w = np.minimum(ws + aw.kernel, aw.size + aw.pad) - ws
        divisor = np.outer(size_h, size_w)
        self.divisor = np.where(divisor == 0, 1, divisor).astype(dtype)  # 0 only past the image
        self.empty = np.logical_or.outer(hs >= ah.size, ws >= aw.size)  # windows with no cell
        self.plane_index = np.add.outer(hs * aw.size, ws)  # Caffe's flat index of cell (hs, ws)
        rel = [i * aw.size + j for i, j in self.offsets]
        self.offset_index = np.array([0, *rel], np.intp)  # argmax 0 means "no cell"
        n_idx = len(self.offsets) + 1
        self.index_dtype = np.uint8 if n_idx < 256 else np.uint16 if n_idx < 65536 else np.uint32
        self._base: np.ndarray | None = None
        self._blocks: dict[tuple[int, int], _MaxScratch] = {}  # by (worker, block size)
        self._route_work: dict[int, Workspace] = {}  # by worker
        self.window_matrix = None  # (H*W, PH*PW): AVE sums as one GEMM
        if self.method == AVE and not self.whole and shape[2] * shape[3] <= AVE_GEMM_MAX_CELLS:
            self.window_matrix = np.kron(ah.window_matrix(), aw.window_matrix()).T.astype(dtype)

    # -- forward ---------------------------------------------------------------------------------
    def _load(self, x: np.ndarray, fill: float) -> np.ndarray:
        """The phase planes of ``x``; cells outside the input hold ``fill``."""
        planes = self._work.get(f"planes{fill}", self.planes.shape, x.dtype, fill=fill)
        self.planes.load(x, planes)
        return planes

    def _wide(self, name: str, dtype: np.dtype | type, fill: float | None = None) -> np.ndarray:
        return self._work.get(name, self.planes.wide_shape, dtype, fill)

    def _views(self, planes: np.ndarray):
        return (self.planes.view(planes, offset) for offset in self.offsets)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x, y = bottom[0].data, top[0].data
        if self.method == MAX:
            if self.whole:
                self._max_whole(x, y)
            else:  # the argmax is needed by TRAIN backward and the mask top
                self._max(x, y, track=self.phase == TRAIN or len(top) > 1)
            if len(top) > 1:
                self._write_mask(top[1].data)
        elif self.method == AVE:
            if self.whole:
                np.divide(x.sum(axis=(2, 3), keepdims=True), self.divisor, out=y)
            elif self.window_matrix is not None:
                np.matmul(_planes2d(x), self.window_matrix, out=_planes2d(y))
                np.divide(y, self.divisor, out=y)
            else:
                total = self._sum_views(self._load(x, 0), "total")
                np.divide(self.planes.narrow(total), self.divisor, out=y)
        elif self.phase == TRAIN:
            self._stochastic_train(x, y)
        else:
            self._stochastic_test(x, y)

    def _sum_views(self, planes: np.ndarray, name: str, square: bool = False) -> np.ndarray:
        """The sum over each window (wide), cell by cell in row-major order as Caffe adds."""
        total = self._wide(name, planes.dtype)
        for n, view in enumerate(self._views(planes)):
            if square:
                view = view * view
            if n == 0:
                np.copyto(total, view)
            else:
                np.add(total, view, out=total)
        return total

    def _index_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed wide argmax (whose real outputs become ``self.argmax``) and a candidate."""
        argmax = self._wide("wide_argmax", self.index_dtype)
        argmax.fill(0)
        self.argmax = self.planes.narrow(argmax)
        return argmax, self._wide("candidate", self.index_dtype)

    def _argmax(self) -> np.ndarray:
        """The (1-based) kernel offset of each output's chosen cell; 0 for none."""
        return self.argmax

    def _max(self, x: np.ndarray, y: np.ndarray, track: bool) -> None:
        """Running max with strict ``>``; the argmax keeps the (1-based) offset of the first max.
        Runs on blocks of the batch small enough for the cache, on parallel threads."""
        self.tracked = track
        if track:
            self.argmax = self._work.get("argmax", y.shape, self.index_dtype)
        incomplete: list[int] = []

        def block(worker: int, start: int, stop: int) -> None:
            s = self._max_scratch(worker, stop - start, x.dtype)
            xb = x[start:stop]
            for target, cells in s.loads:
                np.copyto(target, xb[cells])
            s.best.fill(-FLT_MAX)
            if not track:
                for view in s.views:
                    np.fmax(s.best, view, out=s.best)
                np.copyto(y[start:stop], s.grid.narrow(s.best))
                return
            s.argmax.fill(0)
            for i, view in enumerate(s.views, 1):
                np.greater(view, s.best, out=s.greater)
                np.fmax(s.best, view, out=s.best)  # fmax: a NaN never wins, as with Caffe's ``>``
                # offsets only increase, so the last one that beat the running max is the max
                np.multiply(s.greater.view(np.uint8), self.index_dtype(i), out=s.candidate)
                np.maximum(s.argmax, s.candidate, out=s.argmax)
            np.copyto(y[start:stop], s.grid.narrow(s.best))
            argmax = self.argmax[start:stop]
            np.copyto(argmax, s.grid.narrow(s.argmax))
            if not argmax.all():
                incomplete.append(start)

        for_batch_blocks(block, x.shape[0], x[0].size, POOL_BLOCK_WORK)
        self.complete = not incomplete

    def _max_scratch(self, worker: int, n: int, dtype: np.dtype) -> _MaxScratch:
        key = (worker, n)
        if key not in self._blocks:
            grid = PhasePlanes((n, *self.planes.lead[1:]), self.planes.axes)
            self._blocks[key] = _MaxScratch(grid, self.offsets, dtype, self.index_dtype)
        return self._blocks[key]

    def _max_whole(self, x: np.ndarray, y: np.ndarray) -> None:
        flat = x.reshape(*x.shape[:2], -1)
        self.whole_argmax = flat.argmax(axis=-1)  # numpy returns the first maximum
        np.copyto(y[..., 0, 0], np.take_along_axis(flat, self.whole_argmax[..., None], -1)[..., 0])
        none = ~(y[..., 0, 0] > -FLT_MAX)  # Caffe starts from -FLT_MAX
        self.complete = not none.any()
        if not self.complete:
            y[none, 0, 0] = -FLT_MAX
            self.whole_argmax[none] = -1

    def _write_mask(self, mask: np.ndarray) -> None:
        if self.whole:
            np.copyto(mask[..., 0, 0], self.whole_argmax)
            return
        argmax = self._argmax()
        index = np.take(self.offset_index, argmax) + self.plane_index
        if not self.complete:
            index[argmax == 0] = -1
        np.copyto(mask, index)

    def _stochastic_train(self, x: np.ndarray, y: np.ndarray) -> None:
        """Pick the first cell whose running sum reaches ``u * sum`` (u uniform in [0, 1))."""
        planes = self._load(x, 0)
        total = self._sum_views(planes, "total")
        threshold = self._wide("threshold", x.dtype, fill=0)
        narrow = self.planes.narrow
        np.multiply(self.rng.random(y.shape, dtype=x.dtype), narrow(total), out=narrow(threshold))
        running, chosen = self._wide("running", x.dtype), self._wide("chosen", x.dtype)
        running.fill(0)
        chosen.fill(0)
        found, reached = self._wide("found", np.bool_), self._wide("reached", np.bool_)
        found.fill(False)
        argmax, candidate = self._index_buffers()
        for n, view in enumerate(self._views(planes), 1):
            running += view
            np.greater_equal(running, threshold, out=reached)
            np.greater(reached, found, out=reached)  # reached now, not before
            found |= reached
            chosen += view * reached  # a masked copy is slower with scattered masks
            np.multiply(reached.view(np.uint8), self.index_dtype(n), out=candidate)
            np.maximum(argmax, candidate, out=argmax)
        np.copyto(y, narrow(chosen))
        if self.empty.any():
            self._argmax()[..., self.empty] = 0
            y[..., self.empty] = 0
        self.complete = bool(self._argmax().all())

    def _stochastic_test(self, x: np.ndarray, y: np.ndarray) -> None:
        planes = self._load(x, 0)
        total = self._wide("total", x.dtype)
        total.fill(FLT_MIN)  # Caffe starts the sum at FLT_MIN to avoid 0/0
        for view in self._views(planes):
            np.add(total, view, out=total)
        squares = self._sum_views(planes, "squares", square=True)
        np.divide(self.planes.narrow(squares), self.planes.narrow(total), out=y)
        # backward needs the output; the top may be changed in place by then
        np.copyto(self.planes.narrow(self._wide("output", y.dtype, fill=0)), y)

    # -- backward --------------------------------------------------------------------------------
    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        if self.method == AVE and self.whole:
            np.copyto(dx, dy / self.divisor)
        elif self.method == AVE and self.window_matrix is not None:
            np.matmul(_planes2d(dy / self.divisor), self.window_matrix.T, out=_planes2d(dx))
        elif self.method == AVE:
            self._spread(dy, self.divisor, dx)
        elif self.method == STOCHASTIC and self.phase != TRAIN:
            self._spread(dy, self.planes.narrow(self._wide("total", dy.dtype)), dx,
                         self._wide("output", dy.dtype, fill=0))
        elif self.method == MAX and self.whole:
            dx.fill(0)
            flat = dx.reshape(*dx.shape[:2], -1)
            keep = self.whole_argmax >= 0
            np.put_along_axis(flat, np.where(keep, self.whole_argmax, 0)[..., None],
                              np.where(keep, dy[..., 0, 0], 0)[..., None], -1)
        else:
            if self.method == MAX and not self.tracked:  # a TEST forward skipped the argmax
                self._max(bottom[0].data, self._work.get("rerun", dy.shape, dy.dtype), True)
            self._route_to_argmax(dy, dx)

    def _route_to_argmax(self, dy: np.ndarray, dx: np.ndarray) -> None:
        """Add each top diff to its argmax cell: ``np.add.at`` over flat indices, which
        accumulates repeated cells (overlapping windows) in Caffe's output order. Runs on blocks
        of the batch on parallel threads; a block's indices stay within its own items."""
        if self._base is None or self._base.shape != dy.shape:
            n, c, h, w = dx.shape
            planes = (np.arange(n * c, dtype=np.intp) * (h * w)).reshape(n, c, 1, 1)
            self._base = planes + self.plane_index
        argmax, complete = self._argmax(), self.complete

        def block(worker: int, start: int, stop: int) -> None:
            ws = self._route_work.setdefault(worker, Workspace())
            index = ws.get(f"index{stop - start}", (stop - start, *dy.shape[1:]), np.intp)
            np.take(self.offset_index, argmax[start:stop], out=index, mode="clip")  # fast path
            index += self._base[:stop - start]
            dxb, dyb = dx[start:stop], dy[start:stop]
            dxb.fill(0)
            if complete:
                np.add.at(dxb.reshape(-1), index.reshape(-1), dyb.reshape(-1))
            else:
                keep = argmax[start:stop] != 0
                np.add.at(dxb.reshape(-1), index[keep], dyb[keep])

        for_batch_blocks(block, dx.shape[0], dx[0].size, POOL_BLOCK_WORK)

    def _spread(self, dy: np.ndarray, divisor: np.ndarray, dx: np.ndarray,
                y: np.ndarray | None = None) -> None:
        """Add ``dy / divisor`` (AVE) or ``dy / divisor * (2x - y)`` (STOCHASTIC TEST, y wide)
        to every cell of each window, in phase planes, then write the input cells to ``dx``."""
        scaled = self._wide("scaled", dy.dtype, fill=0)  # zero outside the real outputs
        np.divide(dy, divisor, out=self.planes.narrow(scaled))
        dplanes = self._work.get("dplanes", self.planes.shape, dy.dtype)
        dplanes.fill(0)
        inputs = self._views(self._work.get("planes0", self.planes.shape, dy.dtype)) \
            if y is not None else None
        for target in self._views(dplanes):
            if inputs is None:
                np.add(target, scaled, out=target)
            else:
                target += scaled * (2 * next(inputs) - y)
        if not self.planes.covers_input():
            dx.fill(0)
        self.planes.store(dplanes, dx)


class _MaxScratch:
    """One worker's buffers for MAX pooling blocks of a given size, and their views."""

    def __init__(self, grid: PhasePlanes, offsets: Sequence[tuple[int, ...]], dtype: np.dtype,
                 index_dtype: type) -> None:
        self.grid = grid
        self.planes = np.full(grid.shape, -FLT_MAX, dtype)  # cells outside the input stay so
        self.loads = grid.load_targets(self.planes)
        self.views = [grid.view(self.planes, offset) for offset in offsets]
        self.best = np.empty(grid.wide_shape, dtype)
        self.greater = np.empty(grid.wide_shape, np.bool_)
        self.argmax = np.empty(grid.wide_shape, index_dtype)
        self.candidate = np.empty(grid.wide_shape, index_dtype)


def _planes2d(array: np.ndarray) -> np.ndarray:
    """(N, C, H, W) as (N*C, H*W): one row per plane."""
    return array.reshape(array.shape[0] * array.shape[1], -1)


def _trimmed(axis: PoolAxis, method: int) -> PoolAxis:
    """For MAX, the same windows with the rows that lie in the padding of every window cut off.

    Windows are clipped to the input, so cutting ``d`` cells off both ends of the kernel and
    ``d`` off the pad changes neither the output size nor any window's cells while every window
    keeps its first ``d`` cells before the input and its last ``d`` after it. A padded kernel
    far larger than the input (kernel_size: 2000 pad: 1000 on 8x8) then costs what a 16x16
    one does instead of minutes. AVE counts padding in its divisor and keeps the axis as is.
    """
    if method != MAX:
        return axis
    d = min(axis.pad - (axis.out - 1) * axis.stride, axis.kernel - axis.pad - axis.size)
    if d <= 0:
        return axis
    return PoolAxis(axis.size, axis.kernel - 2 * d, axis.stride, axis.pad - d, axis.out)
