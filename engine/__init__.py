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
from engine.net import Net, set_memory_limit
from engine.python_layer import allow_python_layers, python_layers_allowed

# isort: split
# pycaffe's modules and NetSpec names (caffe.layers is engine.layers: CamelCase attributes
# there are NetSpec layer factories, lowercase ones the implementation modules); caffe.io,
# Classifier, Detector; the solver classes below
from engine import coord_map, draw, io, layers, net_spec, proto
from engine.classifier import Classifier
from engine.detector import Detector
from engine.device import version as _version
from engine.net_spec import NetSpec, params, to_proto
from engine.runtime import (
    NCCL,
    Timer,
    has_nccl,
    init_log,
    log,
    set_multiprocess,
    set_solver_count,
    set_solver_rank,
    solver_count,
    solver_rank,
)

__version__ = _version()

# The solver classes live in the `solvers` package, which imports engine; they load on first use.
_PYCAFFE_SOLVERS = ("SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
                    "AdaDeltaSolver", "AdamSolver", "get_solver")


def __getattr__(name: str):
    if name in _PYCAFFE_SOLVERS:
        from solvers import pycaffe

        return getattr(pycaffe, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PYCAFFE_SOLVERS})


__all__ = [
    "LAYERS",
    "NCCL",
    "TEST",
    "TRAIN",
    "AdaDeltaSolver",
    "AdaGradSolver",
    "AdamSolver",
    "Blob",
    "Classifier",
    "Detector",
    "Layer",
    "MokaError",
    "NesterovSolver",
    "Net",
    "NetSpec",
    "RMSPropSolver",
    "SGDSolver",
    "Timer",
    "__version__",
    "allow_python_layers",
    "coord_map",
    "draw",
    "get_solver",
    "has_nccl",
    "init_log",
    "io",
    "layer_type_list",
    "layers",
    "log",
    "net_spec",
    "params",
    "proto",
    "python_layers_allowed",
    "register_layer",
    "set_device",
    "set_memory_limit",
    "set_mode_cpu",
    "set_mode_gpu",
    "set_multiprocess",
    "set_random_seed",
    "set_solver_count",
    "set_solver_rank",
    "solver_count",
    "solver_rank",
    "to_proto",
]
