"""Moka: a Caffe-style declarative deep-learning engine.

A pycaffe-compatible surface: ``engine.Net(model, engine.TEST, weights=...)``,
``net.blobs[name].data``, ``net.params[layer][i]``, ``net.forward()``, ``net.backward()``.
"""

from engine.blob import Blob
from engine.errors import MokaError
from engine.layer import LAYERS, TEST, TRAIN, Layer, register_layer
from engine.net import Net

__all__ = ["LAYERS", "TEST", "TRAIN", "Blob", "Layer", "MokaError", "Net", "register_layer"]
