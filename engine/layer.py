"""Layer base classes and the registry keyed by Caffe's type string.

The contract, as Caffe's: ``setup`` reads the layer's ``*_param`` once and creates the learnable
``blobs``; ``reshape`` sizes the tops from the bottoms; ``forward`` fills top data; ``backward``
fills bottom diffs from top diffs. **Bottom diffs are overwritten; parameter diffs accumulate**
(the solver zeroes them each iteration, which is what makes ``iter_size`` work). The Net owns
fan-out (Split layers) and loss weights.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from engine.blob import (
    Blob,
    blob_proto_array,
    blob_proto_shape,
    legacy_shape_matches,
    shape_only_active,
)
from engine.errors import LayerError, NetError
from engine.fillers import fill_into

TRAIN, TEST = 0, 1  # caffe.Phase

LAYERS: dict[str, type[Layer]] = {}
# Types Moka knows by name but does not run (a fork's training-only layers): type -> why.
UNSUPPORTED: dict[str, str] = {}


def register_layer(cls: type[Layer]) -> type[Layer]:
    """Class decorator: register ``cls`` under its class name, which is Caffe's type string."""
    name = cls.__name__
    if name in LAYERS:
        raise ValueError(f"layer type {name!r} is registered twice")
    LAYERS[name] = cls
    cls.type = name
    return cls


def layer_class(type_name: str, layer_name: str = "") -> type[Layer]:
    """The class registered for ``type_name``; an unknown type names the close matches."""
    import engine.layers  # noqa: F401  (registers every built-in layer)

    if type_name in LAYERS:
        return LAYERS[type_name]
    where = f"layer '{layer_name}': " if layer_name else ""
    if type_name in UNSUPPORTED:
        raise NetError(f"{where}type {type_name!r} is not supported: {UNSUPPORTED[type_name]}")
    close = difflib.get_close_matches(type_name, LAYERS, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise NetError(
        f"{where}unknown layer type {type_name!r}{hint} "
        f"(known types: {', '.join(sorted(LAYERS))})"
    )


def create_layer(param, phase: int, rng: np.random.Generator,
                 dtype: np.dtype | type = np.float32) -> Layer:
    """Instantiate the layer a LayerParameter describes."""
    return layer_class(param.type, param.name).create(param, phase, rng, dtype)


class Layer:
    """Base class. Subclasses override ``setup``, ``reshape``, ``forward`` and ``backward``.

    ``n_bottom`` / ``n_top`` give the (min, max) blob counts; ``None`` as max means any number.
    """

    type: str = ""
    n_bottom: tuple[int, int | None] = (1, 1)
    n_top: tuple[int, int | None] = (1, 1)
    auto_top: bool = False  # Caffe's AutoTopBlobs: create anonymous tops up to the minimum
    # What backward reads of the values forward saw. The Net keeps a copy of a value that a
    # later in-place layer overwrites only for a layer that declares it reads it, so the
    # defaults are the safe ones. In place, bottom and top are one array: a layer that keeps
    # its own copy of what it needs from its input there says so with keeps_bottom_in_place.
    backward_needs_bottom_data: bool = True
    backward_needs_top_data: bool = True
    keeps_bottom_in_place: bool = False

    def __init__(self, param, phase: int = TRAIN, rng: np.random.Generator | None = None,
                 dtype: np.dtype | type = np.float32) -> None:
        self.param = param
        self.name: str = param.name
        self.phase = param.phase if param.HasField("phase") else phase
        self.rng = rng if rng is not None else np.random.default_rng()
        self.dtype = np.dtype(dtype)
        self.blobs: list[Blob] = []
        self._stored_blobs = list(param.blobs)  # parameters that came with the LayerParameter
        self.param_propagate_down: list[bool] = []

    @classmethod
    def create(cls, param, phase: int, rng: np.random.Generator,
               dtype: np.dtype | type = np.float32) -> Layer:
        """The layer for ``param`` (a factory may return another class: ``Python``)."""
        return cls(param, phase, rng, dtype)

    # -- the four methods --------------------------------------------------------------------
    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Read ``self.param`` into attributes and create ``self.blobs``. Runs once."""

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.reshape")

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        """Default: the layer has no gradient (data layers, Accuracy)."""

    # -- hooks the Net reads -----------------------------------------------------------------
    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def default_loss_weight(self, top_index: int) -> float:
        return 0.0

    def check_blob_counts(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for what, blobs, (lo, hi) in (("bottom", bottom, self.n_bottom),
                                      ("top", top, self.n_top)):
            n = len(blobs)
            if n < lo or (hi is not None and n > hi):
                want = str(lo) if lo == hi else f"{lo} to {hi}" if hi is not None else f">= {lo}"
                raise self.error(f"takes {want} {what} blob(s), got {n}")

    # -- helpers for subclasses ----------------------------------------------------------------
    def error(self, message: str) -> LayerError:
        return LayerError(self.name, self.type or type(self).__name__, message)

    def param_down(self, j: int) -> bool:
        """Whether parameter blob ``j`` gets a gradient (``param_propagate_down``, which the Net
        fills from ``lr_mult``; a missing entry means the Net did not restrict it)."""
        flags = self.param_propagate_down
        return j >= len(flags) or bool(flags[j])

    def init_param_blobs(self, specs: Sequence[tuple[Sequence[int], object]]) -> None:
        """Create ``self.blobs`` from ``(shape, FillerParameter | None)`` pairs.

        Parameters that came with the LayerParameter are used instead of fillers, after the
        same shape check as Caffe's (legacy 4-d shapes align to the end).
        """
        if self._stored_blobs:
            self.blobs = [self._load_stored(i, shape, specs)
                          for i, (shape, _) in enumerate(specs)]
            return
        self.blobs = []
        for shape, filler in specs:
            blob = Blob(shape, self.dtype)
            if filler is not None and not shape_only_active():  # engine summary: no values
                try:
                    fill_into(blob.data, filler, self.rng)
                except NetError as exc:  # unknown filler type, sparse on a non-gaussian one
                    raise self.error(f"parameter blob {len(self.blobs)}: {exc}") from exc
            self.blobs.append(blob)

    def _load_stored(self, i: int, shape: Sequence[int], specs: Sequence) -> Blob:
        if len(self._stored_blobs) != len(specs):
            raise self.error(f"has {len(specs)} parameter blobs but "
                             f"{len(self._stored_blobs)} were given")
        proto = self._stored_blobs[i]
        if not legacy_shape_matches(proto, shape):
            raise self.error(f"parameter blob {i} should have shape {tuple(shape)}, "
                             f"the stored one has {blob_proto_shape(proto)}")
        blob = Blob(shape, self.dtype)
        blob.data[...] = blob_proto_array(proto, shape)
        return blob

    def __repr__(self) -> str:
        return f"<{self.type} layer '{self.name}'>"


class NeuronLayer(Layer):
    """One bottom, one top of the same shape; safe in place (top is bottom)."""

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)


class LossLayer(Layer):
    """Two bottoms (prediction, target), a scalar top whose loss weight defaults to 1.

    The target (bottom 1) never receives a gradient, even under ``force_backward``.
    """

    n_bottom = (2, 2)
    n_top = (1, 1)
    auto_top = True

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1

    def default_loss_weight(self, top_index: int) -> float:
        return 1.0 if top_index == 0 else 0.0

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.error(
                f"the two bottoms must have the same first (batch) dimension; got "
                f"{bottom[0].shape} and {bottom[1].shape}"
            )
        top[0].reshape(())
