"""The training loop shared by every update rule (Caffe's ``Solver`` / ``SGDSolver``).

A rule is a ``Solver`` subclass that names its per-parameter state (``state_names``) and gives
``compute_update(i, grad, local_rate) -> step``, or, when each element's step depends on that
element alone (Caffe's six rules), ``update_elements(grad, state, local_rate) -> step``, which
the update runs on cache-sized chunks of every parameter (the same arithmetic per element, so
the same bits); everything else lives here: building the train
and test nets, ``step``/``solve`` with Caffe's test, display and snapshot schedule, the fixed
``apply_update`` order, and signal requests. Snapshot files are written by ``solvers.snapshot``.

Before any net is built the parameter is checked (``solvers.validate``). Every iteration the loss
and the gradients are checked for NaN/Inf (``solvers.divergence``): training stops with a
``DivergenceError`` naming the layer, and nothing is snapshotted after the last good state.
``debug_info: true`` logs Caffe's per-layer norms on display iterations (``engine.debug_info``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from os import PathLike

import numpy as np

from engine import caffe_pb2, debug_info
from engine.errors import SolverError
from engine.layer import TEST, TRAIN
from engine.net import Net
from engine.parallel import single_threaded_blas
from engine.python_layer import python_layers_allowed
from engine.upgrade import upgrade_snapshot_prefix
from solvers import divergence
from solvers import snapshot as snapshots
from solvers.lr_policies import PlateauTracker, learning_rate
from solvers.validate import validate_solver_param

log = logging.getLogger("solvers")

SOLVERS: dict[str, type[Solver]] = {}
SIGNAL_EFFECTS = ("stop", "snapshot", "none")  # Caffe's --sigint_effect / --sighup_effect
# An elementwise update runs every step of the rule on chunks of this many elements of a
# parameter, whose data, diff and state stay in cache between the steps.
UPDATE_CHUNK = 1 << 15


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator: register ``cls`` under its class name, SolverParameter's ``type``."""
    if cls.__name__ in SOLVERS:
        raise ValueError(f"solver type {cls.__name__!r} is registered twice")
    SOLVERS[cls.__name__] = cls
    return cls


def get_solver(source, weights: str | None = None, dtype=np.float32,
               allow_python: bool | None = None) -> Solver:
    """A solver from a solver prototxt path or a SolverParameter (pycaffe's ``get_solver``).

    ``weights`` (a comma list of .caffemodel files) replaces the file's ``weights`` field, as
    ``caffe train --weights`` does. ``allow_python`` lets the nets' Python layers run (None:
    the process-wide switch decides; see engine.python_layer).
    """
    from engine.io import read_solver_param

    path = None if isinstance(source, caffe_pb2.SolverParameter) else os.fspath(source)
    param = read_solver_param(source)  # a copy, upgraded (solver_type, snapshot_prefix)
    if param.type not in SOLVERS:
        raise SolverError(f"unknown solver type '{param.type}' (known types: "
                          f"{', '.join(sorted(SOLVERS))})")
    return SOLVERS[param.type](param, path=path, weights=weights, dtype=dtype,
                               allow_python=allow_python)


class Solver:
    """Trains ``net`` with the rule a subclass implements; pycaffe's Solver surface.

    ``iter`` counts completed updates. ``state[i][name]`` is parameter i's rule state (history).
    ``create_snapshot_folder``: a missing snapshot folder is created at the first snapshot
    (``engine train``) instead of being an error (Caffe).
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, param, path: str | PathLike | None = None, weights: str | None = None,
                 dtype=np.float32, create_snapshot_folder: bool = False,
                 allow_python: bool | None = None) -> None:
        self.param = param
        self.path = None if path is None else os.fspath(path)
        self.allow_python = allow_python
        # Python layers' modules may sit beside the solver or the net files
        self._python_search = [] if path is None else [os.path.dirname(os.path.abspath(path))]
        self.dtype = np.dtype(dtype)
        if self.path is not None:
            upgrade_snapshot_prefix(param, self.path)
        for warning in validate_solver_param(  # before any net is built
                param, self.path, create_snapshot_folder=create_snapshot_folder):
            log.warning("%s", warning)
        self.check_param()
        seed = param.random_seed
        self.rng = np.random.default_rng(seed if seed >= 0 else None)
        self.net = self._train_net()
        self._net_debug_info = self.net.debug_info  # the net file's own debug_info
        self.test_nets = self._test_nets()
        self.plateau = self._plateau_tracker()
        self.test_scores: dict[int, list[tuple[str, float]]] = {}
        self.rate = 0.0  # the rate of the last update
        if weights:
            param.ClearField("weights")
            param.weights.append(weights)
        for spec in param.weights:
            for source in spec.split(","):
                log.info("Finetuning from %s", source)
                snapshots.load_weights(self.net, self._find(source.strip(), "weights"))
        self.iter = 0
        self.current_step = 0
        self.state = [{name: np.zeros_like(blob.data) for name in self.state_names}
                      for blob in self.net.learnable_params]
        self.losses: list[float] = []  # the smoothed-loss ring buffer
        self.loss_index = 0  # its oldest entry once full
        self.smoothed_loss = 0.0
        self._callbacks: list[tuple[Callable | None, Callable | None]] = []
        self._signal_effects: dict[int, str] = {}
        self._signals_got: dict[int, bool] = {}
        self._previous_handlers: dict[int, object] = {}
        self._early_exit = False
        self.progress = None  # an object with update(solver), e.g. engine.progress.Progress
        self._chunks: tuple | None = None  # see _update_chunks
        self._update_finite = False  # the last update's params are known to be finite
        self._scratch: np.ndarray | None = None  # the decay term of an update chunk
        # MPI data parallelism (engine.distributed.DataParallel.attach): reduces the gradients
        # over the ranks; only its rank 0 tests and snapshots
        self.reducer = None
        log.info("Solver scaffolding done.")

    # -- what a rule provides ----------------------------------------------------------------
    def check_param(self) -> None:
        """Rule-specific checks of ``self.param``; raise SolverError."""

    def compute_update(self, i: int, grad: np.ndarray, local_rate: float) -> np.ndarray:
        """The step for learnable param ``i`` (``data -= step``); may overwrite ``grad``."""
        return self.update_elements(grad, self.state[i], local_rate)

    def update_elements(self, grad: np.ndarray, state: dict[str, np.ndarray],
                        local_rate: float) -> np.ndarray:
        """The step for the elements ``grad`` of a param whose state arrays (by name, the same
        elements) are ``state``: for a rule whose every element's step depends on that element
        alone. May overwrite ``grad`` and must update ``state`` in place."""
        raise NotImplementedError(f"{type(self).__name__} gives neither compute_update nor "
                                  "update_elements")

    def _elementwise(self) -> bool:
        """Whether the update may run on chunks: the rule gives ``update_elements`` and does
        not override ``compute_update``."""
        rule = type(self)
        return (rule.compute_update is Solver.compute_update
                and rule.update_elements is not Solver.update_elements)

    # -- setup ---------------------------------------------------------------------------------
    def _plateau_tracker(self) -> PlateauTracker | None:
        """lr_policy "plateau": check the monitored output exists and pick min or max."""
        p = self.param
        if p.lr_policy != "plateau":
            return None
        mode = p.plateau_mode
        if p.plateau_monitor != "train_loss":
            net = self.test_nets[p.plateau_test_net]
            if p.plateau_monitor not in net.outputs:
                raise SolverError(f"plateau_monitor '{p.plateau_monitor}' is not an output of "
                                  f"test net #{p.plateau_test_net} (its outputs: "
                                  f"{', '.join(net.outputs)}; or use 'train_loss' for the smoothed "
                                  "train loss)")
            if mode == "auto":
                mode = "min" if net.blob_loss_weights.get(p.plateau_monitor) else "max"
        elif mode == "auto":
            mode = "min"
        log.info("Plateau policy: watching %s (%s) every %d iterations, patience %d rounds",
                 "the smoothed train loss" if p.plateau_monitor == "train_loss" else
                 f"test net #{p.plateau_test_net} output '{p.plateau_monitor}'", mode,
                 p.test_interval, p.plateau_patience)
        return PlateauTracker(p, mode)

    def _find(self, name: str, field: str) -> str:
        """A path as Caffe reads it (from the working directory), else beside the solver file."""
        if os.path.exists(name) or self.path is None:
            return name
        beside = os.path.join(os.path.dirname(self.path), name)
        if os.path.exists(beside):
            return beside
        raise SolverError(f"{field} file '{name}' not found (looked in {os.getcwd()} and "
                          f"beside the solver file {self.path})")

    def _read_net(self, name: str, field: str):
        from engine.io import read_net_param

        found = self._find(name, field)
        self._python_search.append(os.path.dirname(os.path.abspath(found)))
        return read_net_param(found)

    def _make_net(self, net_param, phase: int, extra_state) -> Net:
        state = caffe_pb2.NetState()
        state.phase = phase
        state.MergeFrom(net_param.state)
        state.MergeFrom(extra_state)  # highest precedence, as in Caffe
        net_param.state.CopyFrom(state)
        with python_layers_allowed(self.allow_python, self._python_search):
            return Net(net_param, state=state, rng=self.rng, dtype=self.dtype)

    def _train_net(self) -> Net:
        p = self.param
        fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(fields) != 1:
            raise SolverError("SolverParameter must specify exactly one train net using one of "
                              f"net, net_param, train_net, train_net_param; found {fields or 0}")
        field = fields[0]
        if field.endswith("_param"):
            log.info("Creating training net specified in %s.", field)
            net_param = caffe_pb2.NetParameter()
            net_param.CopyFrom(getattr(p, field))
        else:
            log.info("Creating training net from %s file: %s", field, getattr(p, field))
            net_param = self._read_net(getattr(p, field), field)
        return self._make_net(net_param, TRAIN, p.train_state)

    def _test_nets(self) -> list[Net]:
        p = self.param
        sources = [("test_net_param", n) for n in p.test_net_param]
        sources += [(f"test_net file: {n}", n) for n in p.test_net]
        generic = p.HasField("net") or p.HasField("net_param")
        if p.HasField("net") and p.HasField("net_param"):
            raise SolverError("Both net_param and net may not be specified.")
        if len(p.test_iter) < len(sources) or (not generic and len(p.test_iter) > len(sources)):
            raise SolverError(f"test_iter must be specified for each test network: "
                              f"{len(sources)} test net(s), {len(p.test_iter)} test_iter")
        for _ in range(len(p.test_iter) - len(sources)):
            if p.HasField("net_param"):
                sources.append(("net_param", p.net_param))
            else:
                sources.append((f"net file: {p.net}", p.net))
        if p.test_state and len(p.test_state) != len(sources):
            raise SolverError(f"test_state must be unspecified or specified once per test net; "
                              f"{len(sources)} test net(s), {len(p.test_state)} test_state")
        if sources and p.test_interval <= 0:
            raise SolverError(f"test_interval must be > 0 when there are test nets; got "
                              f"{p.test_interval}")
        nets = []
        for i, (what, source) in enumerate(sources):
            log.info("Creating test net (#%d) specified by %s", i, what)
            if isinstance(source, str):
                net_param = self._read_net(source, "test net")
            else:
                net_param = caffe_pb2.NetParameter()
                net_param.CopyFrom(source)
            extra = p.test_state[i] if p.test_state else caffe_pb2.NetState()
            net = self._make_net(net_param, TEST, extra)
            net.share_with(self.net)
            nets.append(net)
        return nets

    # -- the loop ------------------------------------------------------------------------------
    def add_callback(self, on_start: Callable | None = None,
                     on_gradients_ready: Callable | None = None) -> None:
        """pycaffe's callbacks: before each iteration's forward, and before its update."""
        self._callbacks.append((on_start, on_gradients_ready))

    def solve(self, resume_file: str | PathLike | None = None) -> None:
        """Train to ``max_iter`` (Caffe's Solve), restoring ``resume_file`` first if given.

        ``resume_file="latest"`` resumes from the newest complete snapshot, or starts from
        iteration 0 (with a warning) when there is no snapshot yet: one command line serves a
        first start and every restart after a kill.
        """
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self._early_exit = False
        try:
            if resume_file == snapshots.LATEST and not snapshots.snapshot_files(
                    p.snapshot_prefix):
                log.warning("No snapshot under '%s' yet: starting from iteration 0",
                            p.snapshot_prefix)
                resume_file = None
            if resume_file:
                log.info("Restoring previous solver status from %s", resume_file)
                self.restore(resume_file)
            self.step(p.max_iter - self.iter)
            if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
                self.snapshot()
            if self._early_exit:
                log.info("Optimization stopped early.")
                return
            if p.display and self.iter % p.display == 0:
                loss = self.net.forward_from_to()
                if self.reducer is not None:
                    loss = self.reducer.mean(loss)
                self._update_smoothed_loss(loss)
                log.info("Iteration %d, loss = %g", self.iter, self.smoothed_loss)
            if p.test_interval and self.iter % p.test_interval == 0:
                self.test_all()
            log.info("Optimization Done.")
        finally:
            self.restore_signal_handlers()

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's Step): test, forward/backward, display, update."""
        p = self.param
        stop_iter = self.iter + iters
        self._timer = (time.perf_counter(), self.iter)
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if (p.test_interval and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization)):
                self.test_all()
                if self._early_exit:
                    break
                self._plateau_round()
            for on_start, _ in self._callbacks:
                if on_start:
                    on_start()
            display = bool(p.display and self.iter % p.display == 0)
            self.net.debug_info = display and (p.debug_info or self._net_debug_info)
            loss = self._forward_backward()
            if not (math.isfinite(loss) and divergence.gradients_finite(self.net)):
                self._diverged(divergence.diagnose(self.net), loss)
            self._update_smoothed_loss(loss / p.iter_size)
            if display:
                self._display()
            for _, on_ready in self._callbacks:
                if on_ready:
                    on_ready()
            self.apply_update()
            if not (self._update_finite or divergence.params_finite(self.net)):
                self._diverged(divergence.update_culprit(
                    self.net, debug_info.learnable_owners(self.net)), loss)
            self.iter += 1
            if self.progress is not None:
                self.progress.update(self)
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == "snapshot":
                self.snapshot()
            if request == "stop":
                self._early_exit = True
                break

    def _forward_backward(self) -> float:
        """``iter_size`` passes accumulating the param diffs, then (with a reducer) the diffs
        summed over the MPI ranks and scaled by 1/K; returns the (ranks' mean) summed loss."""
        passes = self.param.iter_size
        loss = 0.0
        for k in range(passes):
            if self.reducer is not None and k == passes - 1:
                self.reducer.start(self.net)  # layer-wise reduction overlaps this backward
            loss += self.net.forward_backward()
        if self.reducer is not None:
            loss, self.current_step = self.reducer.finish(self.net, loss, self.current_step)
        return loss

    def _is_root(self) -> bool:
        """Whether this process tests and snapshots (always, unless MPI rank > 0)."""
        return self.reducer is None or self.reducer.is_root

    def _diverged(self, where: str, loss: float) -> None:
        """Stop: one line naming the layer and the iteration; no snapshot is written."""
        self.net.debug_info = False
        raise divergence.DivergenceError(
            f"training diverged at iteration {self.iter} ({divergence.describe_loss(loss)}): "
            f"{where}. Stopped without snapshotting, so the last snapshot is the last good "
            "state; lower base_lr, set clip_gradients, or set debug_info: true to see every "
            "layer's norms")

    def _plateau_round(self) -> None:
        """One round of lr_policy "plateau": feed the monitored value, drop the rate if due."""
        if self.plateau is None:
            return
        p = self.param
        if p.plateau_monitor == "train_loss":
            if not self.losses:
                return
            value = self.smoothed_loss
        else:
            scores = self.test_scores.get(p.plateau_test_net, [])
            value = next((v for name, v in scores if name == p.plateau_monitor), None)
            if value is None:  # the test was interrupted
                return
        if self.plateau.observe(value):
            self.current_step += 1
            rate, _ = learning_rate(p, self.iter, self.current_step)
            log.info("Plateau: %s has not improved on %g for %d rounds; lr drops to %g "
                     "(drop #%d)", p.plateau_monitor, self.plateau.best, p.plateau_patience,
                     rate, self.current_step)

    def _update_smoothed_loss(self, loss: float) -> None:
        """Mean of the last ``average_loss`` losses, updated incrementally as Caffe does.

        Unlike Caffe, the window is kept across ``step()`` calls and in snapshots, so a resumed
        run shows the same smoothed loss as an uninterrupted one.
        """
        window = self.param.average_loss
        if len(self.losses) < window:
            self.losses.append(loss)
            n = len(self.losses)
            self.smoothed_loss = (self.smoothed_loss * (n - 1) + loss) / n
        else:
            i = self.loss_index
            self.smoothed_loss += (loss - self.losses[i]) / window
            self.losses[i] = loss
            self.loss_index = (i + 1) % window

    def _display(self) -> None:
        start, first_iter = self._timer
        lapse = time.perf_counter() - start
        per_s = (self.iter - first_iter) / (lapse or 1.0)
        log.info("Iteration %d (%g iter/s, %gs/%d iters), loss = %g", self.iter, per_s, lapse,
                 self.param.display, self.smoothed_loss)
        self._timer = (time.perf_counter(), self.iter)
        for k, name, value, weight in _output_values(self.net, self.net.outputs):
            log.info("    Train net output #%d: %s = %g%s", k, name, value, _loss_note(weight,
                                                                                       value))

    # -- the update ----------------------------------------------------------------------------
    def apply_update(self) -> None:
        """rate → clip (before iter_size division, as Caffe) → normalise → decay → rule → step."""
        rate, step = learning_rate(self.param, self.iter, self.current_step)
        if self.param.lr_policy == "multistep" and step != self.current_step:
            log.info("MultiStep Status: Iteration %d, step = %d", self.iter, step)
        self.current_step = step
        rate = float(self.dtype.type(rate))  # Caffe keeps the rate in the net's Dtype
        self.rate = rate
        if self.param.display and self.iter % self.param.display == 0:
            log.info("Iteration %d, lr = %g", self.iter, rate)
        self.clip_gradients()
        show = self.net.debug_info
        local_rates = [float(self.dtype.type(rate * lr)) for lr in self.net.params_lr]
        chunks = None if show or not self._elementwise() else self._update_chunks()
        self._update_finite = False  # not known
        if chunks is not None:
            self._update_finite = self._update_in_chunks(chunks, local_rates)
            return
        owners = debug_info.learnable_owners(self.net) if show else []  # once: a walk of the net
        for i, blob in enumerate(self.net.learnable_params):
            if self.param.iter_size > 1:
                blob.diff *= 1.0 / self.param.iter_size
            self._regularize(i, blob)
            step = self.compute_update(i, blob.diff, local_rates[i])
            if step is not blob.diff:
                blob.diff[...] = step  # Caffe leaves the applied step in the diff
            if show:
                debug_info.update(owners[i], blob.data, blob.diff)
            blob.data -= blob.diff

    def _update_chunks(self) -> list[tuple] | None:
        """Per chunk of ``UPDATE_CHUNK`` elements of a param: (param index, its data, diff and
        state views); kept while the arrays stay the same; None if an array is not contiguous."""
        arrays = [(blob.data, blob.diff, *self.state[i].values())
                  for i, blob in enumerate(self.net.learnable_params)]
        key = [UPDATE_CHUNK, *(id(a) for per_param in arrays for a in per_param)]
        if self._chunks is not None and self._chunks[0] == key:
            return self._chunks[1]
        chunks = None
        if all(a.flags.c_contiguous for per_param in arrays for a in per_param):
            chunks = []
            for i, (data, diff, *_) in enumerate(arrays):
                flat = [data.reshape(-1), diff.reshape(-1)]
                state = {name: a.reshape(-1) for name, a in self.state[i].items()}
                for start in range(0, data.size, UPDATE_CHUNK):
                    part = slice(start, start + UPDATE_CHUNK)
                    chunks.append((i, flat[0][part], flat[1][part],
                                   {name: a[part] for name, a in state.items()}))
        self._chunks = (key, chunks, arrays)  # the arrays: their ids stay theirs while kept
        return chunks

    def _update_in_chunks(self, chunks: list[tuple], local_rates: list[float]) -> bool:
        """``apply_update``'s per-param steps, each element's in the same order and arithmetic,
        chunk by chunk (see ``UPDATE_CHUNK``). Returns True if the new values are all finite
        (False: not sure; ``divergence.finite``'s first test, on each chunk while cached)."""
        p = self.param
        decays = [p.weight_decay * mult for mult in self.net.params_weight_decay]
        scale = 1.0 / p.iter_size if p.iter_size > 1 else None
        if self._scratch is None or self._scratch.shape != (UPDATE_CHUNK,) or \
                self._scratch.dtype != self.dtype:
            self._scratch = np.empty(UPDATE_CHUNK, self.dtype)
        squares = 0.0
        with single_threaded_blas():  # each chunk's dot product: too small to share
            for i, data, diff, state in chunks:
                if scale is not None:
                    diff *= scale
                if decays[i]:
                    self._add_decay(diff, data, decays[i], self._scratch[:data.size])
                step = self.update_elements(diff, state, local_rates[i])
                if step is not diff:
                    np.copyto(diff, step)  # Caffe leaves the applied step in the diff
                data -= diff
                squares += float(np.dot(data, data))
        return math.isfinite(squares)

    def clip_gradients(self) -> None:
        """Scale every diff by clip/norm when the global L2 norm exceeds ``clip_gradients``."""
        clip = self.param.clip_gradients
        if clip < 0:
            return
        sumsq = sum(float(np.vdot(blob.diff, blob.diff)) for blob in self.net.learnable_params)
        norm = math.sqrt(sumsq)
        if norm > clip:
            scale = clip / norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale "
                     "factor %g", norm, clip, scale)
            for blob in self.net.learnable_params:
                blob.diff *= scale

    def _regularize(self, i: int, blob) -> None:
        local_decay = self.param.weight_decay * self.net.params_weight_decay[i]
        if local_decay:
            self._add_decay(blob.diff, blob.data, local_decay)

    def _add_decay(self, diff: np.ndarray, data: np.ndarray, local_decay: float,
                   out: np.ndarray | None = None) -> None:
        """Caffe's Regularize on these elements: ``diff += local_decay * w`` (L2) or
        ``local_decay * sign(w)`` (L1, the other type construction allows); the term is made in
        ``out`` when given."""
        term = data if self.param.regularization_type == "L2" else np.sign(data, out=out)
        diff += np.multiply(term, local_decay, out=out)

    # -- testing -------------------------------------------------------------------------------
    def test_all(self) -> None:
        if not self._is_root():
            return
        for i in range(len(self.test_nets)):
            if self._early_exit:
                break
            self.test_scores[i] = self.test(i)

    def test(self, i: int = 0) -> list[tuple[str, float]]:
        """Average every output element of test net ``i`` over ``test_iter[i]`` forwards."""
        log.info("Iteration %d, Testing net (#%d)", self.iter, i)
        net, n_iter = self.test_nets[i], self.param.test_iter[i]
        net.share_with(self.net)
        totals, loss = None, 0.0
        for _ in range(n_iter):
            self._handle_requests_while_testing()
            if self._early_exit:
                log.info("Test interrupted.")
                return []
            loss += net.forward_from_to()
            values = np.concatenate([net.blobs[name].data.ravel() for name in net.outputs]
                                    or [np.zeros(0)]).astype(np.float64)
            totals = values if totals is None else totals + values
        if self.param.test_compute_loss:
            log.info("Test loss: %g", loss / n_iter)
        scores = []
        rows = _output_values(net, net.outputs)
        for (k, name, _, weight), total in zip(rows, [] if totals is None else totals,
                                               strict=False):
            mean = float(total) / n_iter
            log.info("    Test net output #%d: %s = %g%s", k, name, mean, _loss_note(weight, mean))
            scores.append((name, mean))
        return scores

    # -- signals -------------------------------------------------------------------------------
    def install_signal_handlers(self, sigint: str = "stop", sighup: str = "snapshot") -> None:
        """Handle SIGINT/SIGHUP by requesting stop|snapshot|none (Caffe's --sig*_effect).

        The handler only records the signal; the loop acts on it after the current update (or
        test forward). ``solve()`` puts the previous handlers back when it ends.
        """
        effects = {signal.SIGINT: sigint}
        if hasattr(signal, "SIGHUP"):
            effects[signal.SIGHUP] = sighup
        for sig, effect in effects.items():
            if effect not in SIGNAL_EFFECTS:
                raise SolverError(f"signal effect must be one of {', '.join(SIGNAL_EFFECTS)}; "
                                  f"got '{effect}' for {signal.Signals(sig).name}")
        self.restore_signal_handlers()
        for sig, effect in effects.items():
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
            self._signal_effects[sig] = effect
            self._signals_got[sig] = False

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        self._signal_effects.clear()
        self._signals_got.clear()

    def _on_signal(self, signum: int, frame) -> None:
        self._signals_got[signum] = True

    def _requested_action(self) -> str:
        """The effect of one pending signal (SIGHUP first, as Caffe), clearing it; else none.

        Under MPI the ranks act on the flags they agreed on (any rank's signal), so all stop or
        snapshot after the same iteration; an agreed flag not acted on now stays pending.
        """
        flags = self._signals_got
        if self.reducer is not None:
            flags = self.reducer.agree(flags)
        action = "none"
        for sig in (getattr(signal, "SIGHUP", None), signal.SIGINT):
            if flags.get(sig):
                flags[sig] = False
                action = self._signal_effects[sig]
                break
        if flags is not self._signals_got:
            for sig, pending in flags.items():
                if pending:
                    self._signals_got[sig] = True
        return action

    def _handle_requests_while_testing(self) -> None:
        if self.reducer is not None:
            return  # the ranks decide together after the next iteration (_requested_action)
        while any(self._signals_got.values()):
            request = self._requested_action()
            if request == "snapshot":
                self.snapshot()
            elif request == "stop":
                self._early_exit = True

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> tuple[str, str]:
        """Write ``<prefix>_iter_<iter>.caffemodel`` and ``.solverstate``; returns both paths.

        Under MPI only rank 0 writes (the other ranks return empty paths).
        """
        if not self._is_root():
            return "", ""
        return snapshots.snapshot(self)

    def restore(self, path: str | PathLike) -> None:
        """Resume from a ``.solverstate`` (or ``.solverstate.h5``) written by Moka or Caffe.

        ``"latest"``: the newest complete snapshot under ``snapshot_prefix``, skipping damaged
        ones with a warning.
        """
        snapshots.restore(self, os.fspath(path))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} solver, iter {self.iter}, net '{self.net.name}'>"


def _output_values(net: Net, names: list[str]) -> list[tuple[int, str, float, float]]:
    """(index, blob name, value, loss weight) for every element of the output blobs."""
    rows = []
    for name in names:
        weight = net.blob_loss_weights.get(name, 0.0)
        for value in net.blobs[name].data.ravel().tolist():
            rows.append((len(rows), name, value, weight))
    return rows


def _loss_note(weight: float, value: float) -> str:
    return f" (* {weight:g} = {weight * value:g} loss)" if weight else ""
