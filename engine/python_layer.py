"""``Python`` layers (python_param: module, layer, param_str, share_in_parallel), as pycaffe runs
them, and the switch that allows them.

A Python layer is a class in a user's module that subclasses ``engine.Layer`` (pycaffe's
``caffe.Layer``; ``import engine as caffe`` gives the same name) and defines ``setup(bottom,
top)``, ``reshape(bottom, top)``, ``forward(bottom, top)`` and ``backward(top, propagate_down,
bottom)``. As in pycaffe, the class needs no ``__init__``: the engine creates the instance and
sets ``self.param_str``, ``self.phase`` and ``self.blobs`` (a list with ``add_blob(*shape)``;
the blobs a layer adds in ``setup`` are learnable parameters and go into .caffemodel files). The
instance is the net's layer: ``net.layers[i]`` / ``net.layer_dict[name]`` return it.

Running a prototxt's Python layer runs arbitrary code from a module named in that file, so it is
off unless the user allows it, in one of these ways (the first that says something wins):

- for one net: ``engine.Net(model, phase, allow_python=True)`` (``False`` refuses even when
  allowed process-wide);
- for a block of code: ``with engine.python_layers_allowed(): solver = get_solver(...)``;
- for the process: ``engine.allow_python_layers(True)``, the one line a pycaffe script that does
  ``import engine as caffe`` adds; or the environment variable ``MOKA_ALLOW_PYTHON=1``;
- on the command line: ``engine train/test/time --allow-python``.

Otherwise building the net stops with one line naming the layer, the module and these switches.
The module is imported with ``importlib`` from ``sys.path`` (pycaffe relies on PYTHONPATH),
with the prototxt's folder and the working directory appended to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from engine.blob import Blob
from engine.errors import LayerError
from engine.layer import Layer, register_layer

ENV_SWITCH = "MOKA_ALLOW_PYTHON"
HOW_TO_ALLOW = ("pass --allow-python to engine train/test/time, build the net with "
                "engine.Net(..., allow_python=True), call engine.allow_python_layers(True), "
                f"or set {ENV_SWITCH}=1")

_allowed: bool | None = None  # the process-wide switch; None: ask the environment
_context: contextvars.ContextVar[tuple[bool | None, tuple[str, ...]]] = contextvars.ContextVar(
    "moka_python_layers", default=(None, ()))


def allow_python_layers(allow: bool = True) -> None:
    """Allow (or forbid again) Python layers in every net this process builds."""
    global _allowed
    _allowed = bool(allow)


def python_layers_allowed_now() -> bool:
    """Whether a net built here and now may run its Python layers."""
    override, _ = _context.get()
    if override is not None:
        return override
    if _allowed is not None:
        return _allowed
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def python_layers_allowed(allow: bool | None = True,
                          search: Sequence[str | os.PathLike] = ()) -> Iterator[None]:
    """Within the block, nets may (``allow=True``) or may not (``False``) run Python layers;
    ``None`` leaves the decision to an enclosing block, else to the process-wide switch.
    ``search``: extra folders for the modules (the Net passes its prototxt's)."""
    outer_allow, outer = _context.get()
    folders = tuple(os.fspath(f) for f in search) + outer
    token = _context.set((outer_allow if allow is None else allow, folders))
    try:
        yield
    finally:
        _context.reset(token)


class BlobVec(list):
    """pycaffe's ``layer.blobs``: a list of Blobs that a Python layer extends with
    ``self.blobs.add_blob(*shape)``."""

    def __init__(self, dtype: np.dtype | type = np.float32) -> None:
        super().__init__()
        self.dtype = np.dtype(dtype)

    def add_blob(self, *shape: int) -> Blob:
        blob = Blob(tuple(int(d) for d in shape), self.dtype)
        self.append(blob)
        return blob


@register_layer
class Python(Layer):
    """``type: "Python"``: creates the user's layer class named by ``python_param``.

    Any number of bottoms and tops. Caffe's backward contract holds (bottom diffs overwritten,
    parameter diffs accumulated); a loss layer sets ``loss_weight: 1`` on its top, as in pycaffe.
    """

    @classmethod
    def create(cls, param, phase: int, rng: np.random.Generator,
               dtype: np.dtype | type = np.float32) -> Layer:
        p = param.python_param
        if not p.module or not p.layer:
            raise LayerError(param.name, "Python", "python_param needs both module and layer "
                             f"(got module '{p.module}', layer '{p.layer}')")
        if not python_layers_allowed_now():
            raise LayerError(param.name, "Python",
                             f"runs Python code from module '{p.module}' (class '{p.layer}'), "
                             f"which is off by default; to allow it, {HOW_TO_ALLOW}")
        user_class = _import_class(param.name, p.module, p.layer)
        layer = user_class.__new__(user_class)
        Layer.__init__(layer, param, phase, rng, dtype)
        if user_class.__init__ is not Layer.__init__:
            user_class.__init__(layer, param)  # pycaffe passes the LayerParameter
            Layer.__init__(layer, param, phase, rng, dtype)
        layer.type = "Python"
        layer.n_bottom = (0, None)
        layer.n_top = (0, None)
        layer.param_str = p.param_str
        layer.blobs = BlobVec(dtype)
        return layer


def _import_class(name: str, module_name: str, class_name: str) -> type[Layer]:
    _extend_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LayerError(name, "Python", f"cannot import python_param.module '{module_name}' "
                         f"({exc}); put its folder on PYTHONPATH or beside the prototxt"
                         ) from exc
    user_class = getattr(module, class_name, None)
    if not isinstance(user_class, type) or not issubclass(user_class, Layer):
        found = "not found" if user_class is None else "not a subclass of engine.Layer"
        raise LayerError(name, "Python", f"python_param.layer '{class_name}' in module "
                         f"'{module_name}' ({module.__file__}) is {found}; a Python layer's "
                         "class subclasses engine.Layer (caffe.Layer)")
    return user_class


def _extend_path() -> None:
    """Append the nets' folders (given by the Net) and the working directory to sys.path."""
    _, folders = _context.get()
    for folder in (*folders, os.getcwd()):
        folder = os.path.abspath(folder)
        if folder not in sys.path:
            sys.path.append(folder)
