"""pycaffe's global switches: ``set_mode_cpu``, ``set_random_seed``, ``layer_type_list``.

Moka computes on the CPU with numpy only; the GPU switches exist so pycaffe scripts run
unchanged, and say so once rather than failing.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

_seed: int | None = None


def set_mode_cpu() -> None:
    """Compute on the CPU (Moka's only mode)."""


def set_mode_gpu() -> None:
    """Accepted for pycaffe scripts; Moka runs on the CPU."""
    log.warning("Moka runs on the CPU with numpy; set_mode_gpu() has no effect")


def set_device(device_id: int) -> None:
    """Accepted for pycaffe scripts; there is no device to choose."""
    log.warning("Moka runs on the CPU with numpy; set_device(%s) has no effect", device_id)


def set_random_seed(seed: int) -> None:
    """Seed the generator that nets built without an explicit ``rng`` draw from."""
    global _seed
    _seed = int(seed)


def default_rng() -> np.random.Generator:
    """A generator for a new net: from ``set_random_seed`` if called, else from the OS."""
    return np.random.default_rng(_seed)


def layer_type_list() -> list[str]:
    """Every registered layer type (pycaffe's ``caffe.layer_type_list()``)."""
    from engine.layer import LAYERS, layer_class

    layer_class("Input")  # imports the built-in layers
    return sorted(LAYERS)
