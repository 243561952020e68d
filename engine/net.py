"""Net: builds the layer graph from a NetParameter and runs forward and backward over it.

Construction follows Caffe's ``Net::Init``: filter layers by the NetState, insert Split layers,
wire bottoms and tops (in-place when a top repeats the bottom at the same index), set up each
layer, attach loss weights, share parameters by ``param { name }``, and work out which layers
and bottoms need backward. The public surface is pycaffe's (``blobs``, ``params``, ``layers``,
``forward(**inputs)``, ``backward(**diffs)``, ``copy_from``, ``save``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike

import numpy as np

from engine import caffe_pb2, debug_info, mode
from engine.blob import (
    Blob,
    MemoryBudget,
    blob_proto_array,
    blob_proto_shape,
    legacy_shape_matches,
    memory_budget,
)
from engine.errors import MokaError, NetError, ResourceError
from engine.graph import filter_net, insert_splits
from engine.in_place import plan_in_place
from engine.layer import TEST, TRAIN, Layer, create_layer
from engine.memory import RecyclePlan, SharedWorkspace, bind, input_signature, plan_recycling
from engine.python_layer import python_layers_allowed

log = logging.getLogger(__name__)

STRICT, PERMISSIVE = 0, 1  # ParamSpec.DimCheckMode


def make_state(net_param, phase: int, level: int = 0, stages: Iterable[str] = ()):
    """The NetState a net is built with: the file's ``state``, then phase/level/stages."""
    state = caffe_pb2.NetState()
    state.CopyFrom(net_param.state)
    state.phase = phase
    state.level = level
    state.stage.extend(s for s in stages if s not in state.stage)
    return state


# The memory limit nets are built under when they name none: "available" (the machine's
# available memory, read when each net is built), a byte count, or None for no limit.
_memory_limit: int | str | None = "available"
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def available_memory() -> int | None:
    """The machine's available memory in bytes (``MemAvailable`` in /proc/meminfo), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parse_memory_limit(value: int | str | None) -> int | str | None:
    """``4G``, ``512M``, ``1000000`` (bytes), ``available`` or ``none``: a limit for nets."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value <= 0:
            raise MokaError(f"a memory limit must be positive; got {value}")
        return value
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    if text in ("AVAILABLE", "NONE", "OFF"):
        return "available" if text == "AVAILABLE" else None
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    try:
        amount = float(text[:len(text) - len(unit)])
    except ValueError:
        amount = -1.0
    if not amount > 0 or amount == float("inf"):
        raise MokaError(f"cannot read the memory limit {value!r}: give bytes or a size such as "
                        "512M, 4G or 1.5T, 'available' or 'none'")
    return int(amount * _SIZE_UNITS[unit])


def set_memory_limit(limit: int | str | None) -> None:
    """The memory limit for nets built from now on (see :func:`parse_memory_limit`).

    Set-up refuses, before allocating, a net whose parameters and activations (data and diff)
    would pass it, naming the layer, the shape and the bytes. The default is "available".
    """
    global _memory_limit
    _memory_limit = parse_memory_limit(limit)


@contextlib.contextmanager
def memory_limit(limit: int | str | None) -> Iterator[None]:
    """:func:`set_memory_limit` for the nets built inside the block ("default": unchanged)."""
    global _memory_limit
    saved = _memory_limit
    if limit != "default":
        set_memory_limit(limit)
    try:
        yield
    finally:
        _memory_limit = saved


def _resolve_memory_limit(limit: int | str | None) -> int | None:
    limit = parse_memory_limit(limit)
    return available_memory() if limit == "available" else limit  # type: ignore[return-value]


class Net:
    """A Caffe net. ``Net(model, phase, weights=None, level=0, stages=())``.

    pycaffe's older ``Net(model, weights, phase)`` form is accepted too. ``model`` is a prototxt
    path or a NetParameter; ``state`` (a NetState) overrides phase/level/stages when given.
    ``allow_python`` lets the net's ``Python`` layers run user code (None: the process-wide
    switch decides; see engine.python_layer). ``memory_limit`` (bytes, "4G", "none") bounds
    what the net's blobs may allocate; the default is :func:`set_memory_limit`'s.
    ``recycle=True`` (a net that runs forward only) reuses intermediate blobs' memory; only
    inputs, outputs and kept blobs keep their values (:meth:`recycle_memory`, engine/memory.py).
    """

    def __init__(self, model=None, *args, weights: str | PathLike | None = None, level: int = 0,
                 stages: Sequence[str] | None = (), phase: int | None = None, state=None,
                 rng: np.random.Generator | None = None, dtype=np.float32,
                 allow_python: bool | None = None,
                 network_file: str | PathLike | None = None,
                 memory_limit: int | str | None = "default", recycle: bool = False) -> None:
        phase, weights = _phase_and_weights(args, phase, weights)
        from engine.io import read_net_param  # io imports net-free helpers only

        if model is None:  # pycaffe's keyword form: Net(network_file=..., phase=...)
            if network_file is None:
                raise TypeError("Net() needs a model: Net('net.prototxt', engine.TEST)")
            model = network_file
        net_param = read_net_param(model)
        if state is None:
            state = make_state(net_param, TRAIN if phase is None else phase, level, stages or ())
        self.name = net_param.name
        self.state = state
        self.phase = state.phase
        self.rng = rng if rng is not None else mode.default_rng()
        self.dtype = np.dtype(dtype)
        self.force_backward = net_param.force_backward
        self.debug_info = net_param.debug_info  # Caffe's per-layer norms (engine/debug_info.py)
        is_file = isinstance(model, str | PathLike) and os.path.isfile(model)
        folders = [os.path.dirname(os.path.abspath(model))] if is_file else []
        limit = _memory_limit if memory_limit == "default" else memory_limit
        # a TEST net allocates no diffs (engine/memory.py) unless it can be run backward
        self._budget = MemoryBudget(_resolve_memory_limit(limit),
                                    with_diff=state.phase == TRAIN or net_param.force_backward)
        with python_layers_allowed(allow_python, folders), memory_budget(self._budget):
            try:
                self._build(insert_splits(filter_net(net_param, state)))
            except NetError as exc:
                if is_file:
                    _name_the_file(exc, os.fspath(model))
                raise
        if weights is not None:
            self.copy_from(weights)
        if recycle:
            self.recycle_memory()

    # -- construction --------------------------------------------------------------------------
    def _build(self, param) -> None:
        self.layers: list[Layer] = []
        self.blobs: OrderedDict[str, Blob] = OrderedDict()
        self.bottom_vecs: list[list[Blob]] = []
        self.top_vecs: list[list[Blob]] = []
        self.bottom_names: OrderedDict[str, list[str]] = OrderedDict()
        self.top_names: OrderedDict[str, list[str]] = OrderedDict()
        self.bottom_need_backward: list[list[bool]] = []
        self.layer_need_backward: list[bool] = []
        self.loss_weights: list[list[float]] = []
        self.inputs: list[str] = []
        self._blob_need_backward: dict[str, bool] = {}
        self._available: dict[str, None] = {}  # produced and not yet consumed, in order
        self._param_owners: dict[str, tuple[int, int]] = {}
        self.learnable_params: list[Blob] = []
        self.params_lr: list[float] = []
        self.params_weight_decay: list[float] = []
        self.learnable_param_names: list[str] = []
        self._layer_params = list(param.layer)
        for layer_param in param.layer:
            self._append_layer(layer_param)
        self.outputs: list[str] = list(self._available)
        self._sweep_backward()
        if self.force_backward:
            self._force_backward()
        self._plan_in_place()
        self._share_workspaces()
        self.blob_loss_weights = OrderedDict((n, 0.0) for n in self.blobs)
        for names, weights in zip(self.top_names.values(), self.loss_weights, strict=True):
            for name, w in zip(names, weights, strict=True):
                if name in self.blob_loss_weights:
                    self.blob_loss_weights[name] = w

    def _append_layer(self, layer_param) -> None:
        index = len(self.layers)
        if not layer_param.HasField("phase"):
            layer_param.phase = self.phase
        layer = create_layer(layer_param, self.phase, self.rng, self.dtype)
        log.info("Creating Layer %s", layer.name)
        if layer.name in self.top_names:  # the net's tables (and copy_from) go by layer name
            raise layer.error("another layer of this net has the same name; layer names must be "
                              "unique within a phase (rename one, or give each an include rule)")
        if layer_param.propagate_down and len(layer_param.propagate_down) != len(
                layer_param.bottom):
            raise layer.error(f"propagate_down must be given 0 or {len(layer_param.bottom)} "
                              f"times (once per bottom); got {len(layer_param.propagate_down)}")
        bottom, need = self._wire_bottoms(layer, layer_param)
        top, top_names = self._wire_tops(layer, layer_param)
        self.layers.append(layer)
        self.bottom_vecs.append(bottom)
        self.top_vecs.append(top)
        self.bottom_names[layer.name] = list(layer_param.bottom)
        self.top_names[layer.name] = top_names
        self.bottom_need_backward.append(need)
        if layer.type == "Input":
            self.inputs.extend(top_names)

        layer.check_blob_counts(bottom, top)
        try:
            layer.setup(bottom, top)
            layer.reshape(bottom, top)
        except ResourceError as exc:
            raise layer.error(f"cannot be set up: {exc}") from exc
        except MokaError as exc:
            if "layer '" not in str(exc):  # e.g. a DummyData filler's: say whose, keep the type
                exc.args = (f"layer '{layer.name}' ({layer.type}): {exc}", *exc.args[1:])
            raise
        except (ValueError, IndexError, TypeError, ArithmeticError, MemoryError) as exc:
            raise layer.error(f"could not be set up: {type(exc).__name__}: {exc}") from exc
        self._check_sizes(layer, top, top_names)
        for name, blob in zip(top_names, top, strict=True):
            dims = "".join(f"{d} " for d in blob.shape)  # Caffe's shape_string: "64 20 24 24 "
            log.info("Top shape: %s(%d) [%s]", dims, blob.count, name)
        self.loss_weights.append(self._loss_weights(layer, layer_param, top))
        layer_need = any(self._blob_need_backward.get(n, False) for n in layer_param.bottom)
        layer_need |= self._append_params(index, layer, layer_param)
        self.layer_need_backward.append(layer_need)
        for name in top_names:
            self._blob_need_backward[name] = layer_need

    def _check_sizes(self, layer: Layer, top: list[Blob], top_names: list[str]) -> None:
        """Refuse zero-sized tops and parameters at set-up, naming the layer and the blob."""
        for name, blob in zip(top_names, top, strict=True):
            if 0 in blob.shape:
                raise layer.error(f"top '{name}' would have shape {blob.shape}, with a zero-sized "
                                  "axis; check the layer's parameters and its bottoms' shapes")
        for j, blob in enumerate(layer.blobs):
            if 0 in blob.shape:
                raise layer.error(f"parameter blob {j} would have shape {blob.shape}, with a "
                                  "zero-sized axis; check num_output, kernel and input sizes")

    def _wire_bottoms(self, layer: Layer, layer_param) -> tuple[list[Blob], list[bool]]:
        bottom, need = [], []
        for j, name in enumerate(layer_param.bottom):
            if name not in self.blobs:
                raise layer.error(f"unknown bottom blob '{name}' (bottom {j})")
            log.info("%s <- %s", layer.name, name)
            bottom.append(self.blobs[name])
            flag = self._blob_need_backward.get(name, False)
            if layer_param.propagate_down:
                flag = layer_param.propagate_down[j]
            need.append(flag)
            self._available.pop(name, None)
        return bottom, need

    def _wire_tops(self, layer: Layer, layer_param) -> tuple[list[Blob], list[str]]:
        top, names = [], []
        for j, name in enumerate(layer_param.top):
            in_place = j < len(layer_param.bottom) and layer_param.bottom[j] == name
            if in_place:
                blob = self.blobs[name]
            elif name in self.blobs:
                raise layer.error(f"top blob '{name}' is produced by multiple sources")
            else:
                blob = Blob((), self.dtype)
                self.blobs[name] = blob
            log.info("%s -> %s", layer.name, name)
            top.append(blob)
            names.append(name)
            self._available[name] = None
        lo = layer.n_top[0]
        while layer.auto_top and len(top) < lo:
            top.append(Blob((), self.dtype))  # anonymous: not usable as a bottom
            names.append("(automatic)")
        return top, names

    def _loss_weights(self, layer: Layer, layer_param, top: list[Blob]) -> list[float]:
        given = list(layer_param.loss_weight)
        if given and len(given) != len(top):
            raise layer.error(f"loss_weight must be given 0 or {len(top)} times (once per "
                              f"top); got {len(given)}")
        weights = given or [layer.default_loss_weight(j) for j in range(len(top))]
        for w, blob in zip(weights, top, strict=True):
            if w:
                log.info("    with loss weight %g", w)
                blob.diff[...] = w
        return weights

    def _append_params(self, index: int, layer: Layer, layer_param) -> bool:
        """Register the layer's blobs as parameters; returns whether any has lr_mult != 0."""
        specs = list(layer_param.param)
        if len(specs) > len(layer.blobs):
            raise layer.error(f"has {len(layer.blobs)} parameter blobs but {len(specs)} "
                              "`param` entries")
        any_learning = False
        layer.param_propagate_down = []
        for j in range(len(layer.blobs)):
            spec = specs[j] if j < len(specs) else caffe_pb2.ParamSpec()
            learns = spec.lr_mult != 0
            any_learning |= learns
            layer.param_propagate_down.append(learns)
            self._append_param(index, layer, j, spec)
        return any_learning

    def _append_param(self, index: int, layer: Layer, j: int, spec) -> None:
        blob = layer.blobs[j]
        if not spec.name or spec.name not in self._param_owners:
            if spec.name:
                self._param_owners[spec.name] = (index, j)
            self.learnable_params.append(blob)
            self.params_lr.append(spec.lr_mult)
            self.params_weight_decay.append(spec.decay_mult)
            self.learnable_param_names.append(spec.name or f"{layer.name}[{j}]")
            return
        owner_layer, owner_j = self._param_owners[spec.name]
        owner = self.layers[owner_layer].blobs[owner_j]
        if spec.share_mode == PERMISSIVE:
            if owner.count != blob.count:
                raise layer.error(f"cannot share parameter '{spec.name}': count "
                                  f"{blob.count} {blob.shape} differs from the owner's "
                                  f"{owner.count} {owner.shape} (PERMISSIVE needs equal counts)")
        elif owner.shape != blob.shape:
            raise layer.error(f"cannot share parameter '{spec.name}': shape {blob.shape} "
                              f"differs from the owner's {owner.shape} (STRICT sharing; use "
                              "share_mode: PERMISSIVE to share equal counts)")
        blob.data = owner.data.reshape(blob.shape)
        blob.view_diff_of(owner)
        learnable = self.learnable_params.index(owner) if owner in self.learnable_params else -1
        owner_spec = self._layer_params[owner_layer].param[owner_j]
        for field, values in (("lr_mult", self.params_lr),
                              ("decay_mult", self.params_weight_decay)):
            if not spec.HasField(field):
                continue
            if owner_spec.HasField(field) and getattr(owner_spec, field) != getattr(spec, field):
                raise layer.error(f"shared parameter '{spec.name}' has {field} "
                                  f"{getattr(spec, field)} but its owner has "
                                  f"{getattr(owner_spec, field)}")
            if learnable >= 0:
                values[learnable] = getattr(spec, field)

    def _sweep_backward(self) -> None:
        """Turn backward off where nothing reaches a loss (Caffe's reverse sweep)."""
        under_loss: set[str] = set()
        skip: set[str] = set()
        for i in reversed(range(len(self.layers))):
            names = self.top_names[self.layers[i].name]
            contributes = any(w != 0 or n in under_loss
                              for n, w in zip(names, self.loss_weights[i], strict=True))
            skips = all(n in skip for n in names)
            if self.layer_need_backward[i] and skips:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_need_backward[i])
            if not contributes:
                self.layer_need_backward[i] = False
            if not self.layer_need_backward[i]:
                log.info("%s does not need backward computation.", self.layers[i].name)
            for j, name in enumerate(self.bottom_names[self.layers[i].name]):
                if contributes:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[i][j] = False
                if not self.bottom_need_backward[i][j]:
                    skip.add(name)

    def _force_backward(self) -> None:
        for i, layer in enumerate(self.layers):
            self.layer_need_backward[i] = True
            self.bottom_need_backward[i] = [
                need or layer.allow_force_backward(j)
                for j, need in enumerate(self.bottom_need_backward[i])]
            layer.param_propagate_down = [True] * len(layer.blobs)

    def _plan_in_place(self) -> None:
        """Copies for values that a backward reads and a later in-place layer overwrites."""
        names = {id(blob): name for name, blob in self.blobs.items()}
        self._in_place = plan_in_place(self.layers, self.bottom_vecs, self.top_vecs,
                                       self.layer_need_backward, names)
        self.in_place_copies = self._in_place.records
        for reader, blob, writer in self.in_place_copies:
            log.info("Keeping a copy of %s for %s's backward (%s overwrites it in place)",
                     blob, reader, writer)

    def _share_workspaces(self, backward: bool = True) -> None:
        """One set of scratch buffers for the whole net (engine/memory.py); layers keep state
        for backward only when ``backward`` and they need it."""
        self.workspace = SharedWorkspace()
        for i, layer in enumerate(self.layers):
            share = getattr(layer, "share_workspace", None)
            if share is not None:
                share(self.workspace, keep_for_backward=backward and self.layer_need_backward[i])

    # -- memory recycling (engine/memory.py) -----------------------------------------------------
    _recycle: RecyclePlan | None = None
    _keep: frozenset[str] = frozenset()

    @property
    def recycling(self) -> bool:
        """Whether intermediate blobs share pooled memory (:meth:`recycle_memory`)."""
        return self._recycle is not None

    def recycle_memory(self, on: bool = True) -> None:
        """Let blobs whose last reader has run lend their memory to later blobs.

        For nets that run forward only (a recycled net refuses ``backward``; layers keep no
        state for it). After a forward, inputs, outputs and the blobs named in
        :meth:`keep_blobs` or ``forward(blobs=[...])`` hold their values; other intermediate
        blobs hold whatever later blobs wrote there. ``on=False`` gives every blob its own array
        again (their values come back with the next forward).
        """
        if not on:
            if self._recycle is not None:
                bind(RecyclePlan(), self._recycle, list(self.blobs.values()))
                self._recycle = None
                self._share_workspaces()
                self.reshape()
            return
        if self._recycle is None:
            self._share_workspaces(backward=False)
        self._replan()

    def keep_blobs(self, *names: str) -> None:
        """Keep these blobs' values after forward in a recycled net (each its own array)."""
        for name in names:
            if name not in self.blobs:
                raise NetError(f"no blob '{name}' in net '{self.name}' to keep")
        self._keep = self._keep | frozenset(names)
        if self._recycle is not None and not self._keep <= self._recycle.keep:
            self._replan()

    def _replan(self) -> None:
        previous = self._recycle
        self._recycle = plan_recycling(self, self._keep)
        bind(self._recycle, previous, list(self.blobs.values()))
        self.reshape()  # views (Split, Flatten, Reshape) follow their bottoms into the slots
        log.info("Recycling blob memory: %d pooled buffers, %.1f MB", len(self._recycle.slots),
                 self._recycle.nbytes / 1e6)

    def _check_recycled(self, start: int) -> None:
        if start > 0:
            raise NetError(f"net '{self.name}' recycles blob memory, so a forward must start at "
                           f"the first layer (got layer {start}); net.recycle_memory(False) "
                           "keeps every blob")
        if input_signature(self) != self._recycle.signature:
            self.reshape()
            self._replan()

    # -- running -------------------------------------------------------------------------------
    def _range(self, start, end) -> tuple[int, int]:
        names = self._layer_names
        first = names.index(start) if isinstance(start, str) else (start or 0)
        last = names.index(end) if isinstance(end, str) else (len(names) - 1 if end is None
                                                              else end)
        return first, last

    def forward_from_to(self, start: int = 0, end: int | None = None) -> float:
        """Run layers ``start..end`` inclusive; returns the weighted loss (ForwardFromTo)."""
        end = len(self.layers) - 1 if end is None else end
        if self._recycle is not None:
            self._check_recycled(start)
        loss = 0.0
        for i in range(start, end + 1):
            for run in self._before_forward:
                run(i)
            layer, bottom, top = self.layers[i], self.bottom_vecs[i], self.top_vecs[i]
            with memory_budget(self._budget):
                try:
                    layer.reshape(bottom, top)
                    self._in_place.copy_values(i)
                    layer.forward(bottom, top)
                except (ResourceError, MemoryError) as exc:  # a batch that grew past the limit
                    raise layer.error(f"forward: {type(exc).__name__}: {exc}") from exc
            if self.debug_info:
                debug_info.forward(self, i)
            for run in self._after_forward:
                run(i)
            for w, blob in zip(self.loss_weights[i], top, strict=True):
                if w:
                    loss += w * float(np.sum(blob.data, dtype=np.float64))
        return loss

    def backward_from_to(self, start: int | None = None, end: int = 0) -> None:
        """Backward through layers ``start`` down to ``end`` (Caffe's BackwardFromTo)."""
        start = len(self.layers) - 1 if start is None else start
        if self._recycle is not None:
            raise NetError(f"net '{self.name}' recycles blob memory and cannot run backward; "
                           "build it without recycle=True")
        for i in range(start, end - 1, -1):
            for run in self._before_backward:
                run(i)
            if self.layer_need_backward[i]:
                top, bottom = self._in_place.backward_vecs(i, self.top_vecs[i],
                                                           self.bottom_vecs[i])
                self.layers[i].backward(top, self.bottom_need_backward[i], bottom)
                if self.debug_info:
                    debug_info.backward(self, i)
            for run in self._after_backward:
                run(i)

    def _seed_loss_diffs(self) -> None:
        for weights, top in zip(self.loss_weights, self.top_vecs, strict=True):
            for w, blob in zip(weights, top, strict=True):
                if w:
                    blob.diff[...] = w

    def forward_backward(self) -> float:
        """One forward and backward pass; returns the loss (Caffe's ForwardBackward)."""
        loss = self.forward_from_to()
        self._seed_loss_diffs()
        self.backward_from_to()
        if self.debug_info:
            debug_info.all_params(self)
        return loss

    def forward(self, blobs: Sequence[str] | None = None, start=None, end=None,
                **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """pycaffe's forward: set ``inputs``, run, return the outputs (and ``blobs``) by name."""
        for name, array in inputs.items():
            if name not in self.inputs:
                raise NetError(f"'{name}' is not an input of net '{self.name}'; inputs are "
                               f"{self.inputs}")
            target = self.blobs[name]
            array = np.asarray(array)
            if array.size != target.count:
                raise NetError(f"input '{name}' has shape {array.shape} but the blob is "
                               f"{target.shape}; reshape the blob and call net.reshape()")
            target.data[...] = array.reshape(target.shape)
        if blobs and self._recycle is not None:
            self.keep_blobs(*blobs)
        first, last = self._range(start, end)
        self.forward_from_to(first, last)
        names = list(self.outputs) if end is None else self.top_names[self._layer_names[last]]
        names += [b for b in (blobs or []) if b not in names]
        return {n: self.blobs[n].data for n in names}

    def backward(self, diffs: Sequence[str] | None = None, start=None, end=None,
                 **top_diffs: np.ndarray) -> dict[str, np.ndarray]:
        """pycaffe's backward: set output diffs, run, return the input diffs by name."""
        self._seed_loss_diffs()
        for name, array in top_diffs.items():
            if name not in self.outputs:
                raise NetError(f"'{name}' is not an output of net '{self.name}'; outputs are "
                               f"{self.outputs}")
            self.blobs[name].diff[...] = array
        first, last = self._range(end, start)
        self.backward_from_to(last, first)
        base = list(self.inputs) if end is None else self.bottom_names[self._layer_names[first]]
        names = list(base) + [d for d in (diffs or []) if d not in base]
        return {n: self.blobs[n].diff for n in names}

    def forward_all(self, blobs: Sequence[str] | None = None,
                    **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """pycaffe's forward_all: run ``inputs`` of any length through in batches of the input
        blobs' size (the last one zero-padded) and return the outputs for every item."""
        if not inputs:
            raise NetError("forward_all needs input arrays, e.g. net.forward_all(data=images)")
        total = {len(np.asarray(a)) for a in inputs.values()}
        if len(total) != 1:
            raise NetError(f"forward_all inputs differ in length: {sorted(total)}")
        total_n = total.pop()
        batch = self.blobs[next(iter(inputs))].shape[0]
        results: dict[str, list[np.ndarray]] = {}
        for start in range(0, total_n, batch):
            chunk = {}
            for name, array in inputs.items():
                part = np.asarray(array)[start:start + batch]
                if len(part) < batch:  # pad the last batch, as pycaffe does
                    pad = np.zeros((batch - len(part), *part.shape[1:]), part.dtype)
                    part = np.concatenate([part, pad])
                chunk[name] = part
            for name, out in self.forward(blobs=blobs, **chunk).items():
                results.setdefault(name, []).append(out.copy())
        return {name: np.concatenate(parts)[:total_n] for name, parts in results.items()}

    def reshape(self) -> None:
        """Propagate shapes after a blob was reshaped (pycaffe's ``net.reshape()``)."""
        with memory_budget(self._budget):
            for layer, bottom, top in zip(self.layers, self.bottom_vecs, self.top_vecs,
                                          strict=True):
                try:
                    layer.reshape(bottom, top)
                except ResourceError as exc:
                    raise layer.error(str(exc)) from exc

    def clear_param_diffs(self) -> None:
        for blob in self.learnable_params:
            blob.diff[...] = 0

    # -- pycaffe views -------------------------------------------------------------------------
    @property
    def _layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def layer_dict(self) -> OrderedDict[str, Layer]:
        return OrderedDict((layer.name, layer) for layer in self.layers)

    @property
    def params(self) -> OrderedDict[str, list[Blob]]:
        return OrderedDict((layer.name, layer.blobs) for layer in self.layers if layer.blobs)

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Feed a MemoryData layer (pycaffe's ``set_input_arrays``)."""
        for layer in self.layers:
            if layer.type == "MemoryData":
                layer.reset(data, labels)
                return
        raise NetError(f"net '{self.name}' has no MemoryData layer to feed")

    # -- weights -------------------------------------------------------------------------------
    def copy_from(self, source) -> None:
        """Copy weights by layer name from a .caffemodel path or a NetParameter."""
        if not isinstance(source, caffe_pb2.NetParameter):
            from engine.io import read_net_binary

            source = read_net_binary(source)
        layers = self.layer_dict
        for src in source.layer:
            if src.name not in layers:
                log.info("Ignoring source layer %s", src.name)
                continue
            self._copy_layer(layers[src.name], src)

    def _copy_layer(self, layer: Layer, src) -> None:
        if not src.blobs:
            return
        if len(src.blobs) != len(layer.blobs):
            raise layer.error(f"incompatible number of blobs: the source has {len(src.blobs)}, "
                              f"this net's layer has {len(layer.blobs)}")
        for j, (proto, blob) in enumerate(zip(src.blobs, layer.blobs, strict=True)):
            if not legacy_shape_matches(proto, blob.shape):
                raise layer.error(
                    f"cannot copy param {j} weights: shape mismatch. Source param shape is "
                    f"{blob_proto_shape(proto)}; target param shape is {blob.shape}. To learn "
                    "this layer's parameters from scratch rather than copying from a saved net, "
                    "rename the layer."
                )
            blob.data[...] = blob_proto_array(proto, blob.shape)

    def share_with(self, other: Net) -> None:
        """Share parameter arrays with ``other`` by layer name (test nets with the train net)."""
        theirs = other.layer_dict
        for layer in self.layers:
            source = theirs.get(layer.name)
            if source is None or not layer.blobs:
                continue
            if len(source.blobs) != len(layer.blobs):
                raise layer.error(f"cannot share weights: {len(source.blobs)} blobs in the "
                                  f"other net, {len(layer.blobs)} here")
            for blob, src in zip(layer.blobs, source.blobs, strict=True):
                if blob.shape != src.shape:
                    raise layer.error(f"cannot share weights: shape {src.shape} in the other "
                                      f"net, {blob.shape} here")
                blob.data = src.data
                blob.view_diff_of(src)

    def to_proto(self, write_diff: bool = False):
        """The net as a NetParameter with every layer's blobs (what a .caffemodel holds)."""
        proto = caffe_pb2.NetParameter()
        proto.name = self.name
        for layer, layer_param in zip(self.layers, self._layer_params, strict=True):
            out = proto.layer.add()
            out.CopyFrom(layer_param)
            del out.blobs[:]
            for blob in layer.blobs:
                out.blobs.add().CopyFrom(blob.to_proto(write_diff))
        return proto

    def save(self, path: str | PathLike, write_diff: bool = False) -> None:
        """Write the weights as a binary .caffemodel (atomically)."""
        from engine.io import write_binary

        write_binary(self.to_proto(write_diff), path)

    def save_hdf5(self, path: str | PathLike, write_diff: bool = False) -> None:
        """Write the weights in Caffe's HDF5 layout (``/data/<layer>/<i>``), atomically."""
        from engine.io import write_net_hdf5

        write_net_hdf5(self.to_proto(write_diff), path, write_diff)

    def load_hdf5(self, path: str | PathLike) -> None:
        """Copy weights by layer name from an HDF5 .caffemodel (pycaffe's ``load_hdf5``)."""
        self.copy_from(path)  # copy_from recognises the HDF5 signature

    # -- pycaffe's lower-level names -----------------------------------------------------------
    # per-layer callbacks, each called with the layer index (pycaffe's Net.before_forward etc.)
    _before_forward: tuple = ()
    _after_forward: tuple = ()
    _before_backward: tuple = ()
    _after_backward: tuple = ()

    def before_forward(self, run) -> None:
        self._before_forward = (*self._before_forward, run)

    def after_forward(self, run) -> None:
        self._after_forward = (*self._after_forward, run)

    def before_backward(self, run) -> None:
        self._before_backward = (*self._before_backward, run)

    def after_backward(self, run) -> None:
        """Called after each layer's backward (also for layers that need none, as Caffe)."""
        from engine.runtime import NCCL

        if not isinstance(run, NCCL):  # a CPU build's NCCL hook does nothing
            self._after_backward = (*self._after_backward, run)

    @property
    def _blob_names(self) -> list[str]:
        return list(self.blobs)

    @property
    def _blobs(self) -> list[Blob]:
        return list(self.blobs.values())

    @property
    def _blob_loss_weights(self) -> list[float]:
        return list(self.blob_loss_weights.values())

    @property
    def _inputs(self) -> list[int]:
        return [self._blob_names.index(name) for name in self.inputs]

    @property
    def _outputs(self) -> list[int]:
        return [self._blob_names.index(name) for name in self.outputs]

    def _top_ids(self, i: int) -> list[int]:
        names = self._blob_names
        return [names.index(n) for n in self.top_names[self.layers[i].name] if n in self.blobs]

    def _bottom_ids(self, i: int) -> list[int]:
        names = self._blob_names
        return [names.index(n) for n in self.bottom_names[self.layers[i].name]]

    def _forward(self, start: int, end: int) -> float:
        """Layers ``start..end`` inclusive by index (Caffe's ForwardFromTo); returns the loss."""
        return self.forward_from_to(start, end)

    def _backward(self, start: int, end: int) -> None:
        """Layers ``start`` down to ``end`` by index (Caffe's BackwardFromTo)."""
        self.backward_from_to(start, end)

    def _batch(self, arrays: dict[str, np.ndarray]):
        """Yield ``{name: batch}`` dicts of the net's batch size; the last one zero-padded."""
        num = len(next(iter(arrays.values())))
        batch_size = next(iter(self.blobs.values())).shape[0]
        for i in range(0, num, batch_size):
            batch = {}
            for name, array in arrays.items():
                part = np.asarray(array[i:i + batch_size])
                if len(part) < batch_size:
                    pad = np.zeros((batch_size - len(part), *part.shape[1:]), part.dtype)
                    part = np.concatenate([part, pad])
                batch[name] = part
            yield batch

    def forward_backward_all(self, blobs: Sequence[str] | None = None,
                             diffs: Sequence[str] | None = None,
                             **arrays: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                            dict[str, np.ndarray]]:
        """Forward and backward in batches (pycaffe's ``forward_backward_all``).

        ``arrays`` holds input data (by input name) and output diffs (by output name) of any
        common length; returns ``(outputs and blobs, input and extra diffs)`` for every item.
        """
        inputs = {n: arrays[n] for n in self.inputs if n in arrays}
        top_diffs = {n: arrays[n] for n in self.outputs if n in arrays}
        forward_batches = list(self._batch(inputs)) if inputs else []
        backward_batches = list(self._batch(top_diffs)) if top_diffs else []
        outs: dict[str, list[np.ndarray]] = {}
        grads: dict[str, list[np.ndarray]] = {}
        for k in range(max(len(forward_batches), len(backward_batches))):
            fb = forward_batches[k] if k < len(forward_batches) else {}
            bb = backward_batches[k] if k < len(backward_batches) else {}
            for name, out in self.forward(blobs=blobs, **fb).items():
                outs.setdefault(name, []).append(out.copy())
            for name, diff in self.backward(diffs=diffs, **bb).items():
                grads.setdefault(name, []).append(diff.copy())
        total = len(next(iter(arrays.values()))) if arrays else None
        all_outs = {n: np.concatenate(parts)[:total] for n, parts in outs.items()}
        all_diffs = {n: np.concatenate(parts)[:total] for n, parts in grads.items()}
        return all_outs, all_diffs

    def __repr__(self) -> str:
        phase = "TRAIN" if self.phase == TRAIN else "TEST"
        return f"<Net '{self.name}' {phase}: {len(self.layers)} layers>"


def _name_the_file(exc: NetError, path: str) -> None:
    """Prefix ``exc``'s message with ``path`` and the line where the layer it names begins."""
    message = str(exc)
    if message.startswith(path):
        return
    where = path
    match = re.match(r"layer '([^']*)'", message)
    if match:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        found = re.search(r'\bname\s*:\s*["\']' + re.escape(match.group(1)) + r'["\']', text)
        if found:
            where += f":{text.count(chr(10), 0, found.start()) + 1}"
    exc.args = (f"{where}: {message}", *exc.args[1:])


def _phase_and_weights(args: tuple, phase, weights):
    """Accept pycaffe's ``(phase)`` and legacy ``(weights, phase)`` positional forms."""
    if len(args) > 2:
        raise TypeError("Net(model, phase) or Net(model, weights, phase)")
    if len(args) == 1:
        if isinstance(args[0], int | np.integer):
            phase = int(args[0])
        else:
            weights = args[0]
    elif len(args) == 2:
        weights, phase = args
    if phase is not None and phase not in (TRAIN, TEST):
        raise NetError(f"phase must be engine.TRAIN (0) or engine.TEST (1); got {phase!r}")
    return phase, weights
