"""Layer-test helpers: layers from prototxt snippets, seeded random blobs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf import text_format

from engine import caffe_pb2
from engine.blob import Blob
from engine.layer import TRAIN, Layer, create_layer


def layer_param(text: str) -> caffe_pb2.LayerParameter:
    """A LayerParameter from prototxt text, e.g. ``type: "ReLU" relu_param { }``."""
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not param.name:
        param.name = param.type.lower() or "layer"
    return param


def make_layer(text: str, bottom: Sequence[Blob], n_top: int = 1, phase: int = TRAIN,
               dtype=np.float64, seed: int = 0) -> tuple[Layer, list[Blob]]:
    """Create, set up and reshape a layer on ``bottom``; returns (layer, tops)."""
    layer = create_layer(layer_param(text), phase, np.random.default_rng(seed), dtype)
    top = [Blob((), dtype) for _ in range(n_top)]
    layer.check_blob_counts(bottom, top)
    layer.setup(list(bottom), top)
    layer.reshape(list(bottom), top)
    return layer, top


def forward_tops(layer: Layer, top: list[Blob]) -> list[np.ndarray]:
    """Reshape and forward a layer without bottoms (a data layer); copies of its tops' data."""
    layer.reshape([], top)
    layer.forward([], top)
    return [t.data.copy() for t in top]


def blob_of(array, dtype=np.float64) -> Blob:
    """A blob whose data is ``array``."""
    array = np.asarray(array, dtype)
    blob = Blob(array.shape, dtype)
    blob.data[...] = array
    return blob


def random_blob(shape: Sequence[int], seed: int = 0, dtype=np.float64, low=-1.0,
                high=1.0) -> Blob:
    return blob_of(np.random.default_rng(seed).uniform(low, high, shape), dtype)


def run_forward_backward(text: str, x: np.ndarray, dy: np.ndarray, in_place: bool,
                         phase: int = TRAIN, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """A one-bottom layer forward, then backward with top diff ``dy``, in place or not;
    returns (top data, bottom diff)."""
    bottom = blob_of(x, dtype)
    layer = create_layer(layer_param(text), phase, np.random.default_rng(7), dtype)
    top = [bottom] if in_place else [Blob((), dtype)]
    layer.setup([bottom], top)
    layer.reshape([bottom], top)
    layer.forward([bottom], top)
    y = top[0].data.copy()
    top[0].diff[...] = dy
    layer.backward(top, [True], [bottom])
    return y, bottom.diff.copy()


def in_place_layer(text: str, bottom: list[Blob]):
    """A layer set up with top[0] being bottom[0]."""
    layer = create_layer(layer_param(text), TRAIN, np.random.default_rng(0), np.float64)
    top = [bottom[0]]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    return layer, top
