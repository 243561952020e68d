"""Moka: a Caffe-style declarative deep-learning engine.

A pycaffe-compatible surface: ``engine.Net(model, engine.TEST, weights=...)``,
``net.blobs[name].data``, ``net.params[layer][i]``, ``net.forward()``, ``net.backward()``.
"""

# first: engine.parallel configures OpenBLAS's threads before numpy loads it
from engine import parallel  # noqa: F401
from engine.blob import Blob
from engine.errors import MokaError
from engine.layer import LAYERS, TEST, TRAIN, Layer, register_layer
from engine.mode import (
    layer_type_list,
    set_device,
    set_mode_cpu,
    set_mode_gpu,
    set_random_seed,
)
from engine.net import Net

__all__ = [
    "LAYERS",
    "TEST",
    "TRAIN",
    "Blob",
    "Layer",
    "MokaError",
    "Net",
    "layer_type_list",
    "register_layer",
    "set_device",
    "set_mode_cpu",
    "set_mode_gpu",
    "set_random_seed",
]
