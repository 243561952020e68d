"""Weight fillers, with Caffe's definitions (include/caffe/filler.hpp).

``fill(shape, filler_param, rng)`` returns a float64 array; the caller casts it. The default
FillerParameter is ``constant`` 0: a layer without ``weight_filler`` starts at zeros, as in Caffe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from engine.blob import shape_only_active
from engine.errors import NetError

FillerFn = Callable[[tuple[int, ...], object, np.random.Generator], np.ndarray]
FILLERS: dict[str, FillerFn] = {}

FAN_IN, FAN_OUT, AVERAGE = 0, 1, 2  # FillerParameter.VarianceNorm


def filler(name: str) -> Callable[[FillerFn], FillerFn]:
    def register(fn: FillerFn) -> FillerFn:
        FILLERS[name] = fn
        return fn

    return register


def fill(shape: Sequence[int], param, rng: np.random.Generator) -> np.ndarray:
    """Values for a blob of ``shape`` drawn as ``param`` (a FillerParameter) says."""
    check_filler(param)
    if shape_only_active():  # a net built for its shapes only (engine summary): no values
        return np.broadcast_to(np.zeros((), np.float64), tuple(shape))
    return FILLERS[param.type](tuple(shape), param, rng)


def check_filler(param) -> None:
    """Raise NetError for an unknown filler type or ``sparse`` on a filler that lacks it."""
    if param.type not in FILLERS:
        raise NetError(f"unknown filler type {param.type!r}; known: {', '.join(sorted(FILLERS))}")
    if param.sparse != -1 and param.type != "gaussian":
        raise NetError(f"filler '{param.type}' does not support sparse; only gaussian does")


# Fillers whose values are independent draws of one distribution (sparse gaussian is not)
_IID = frozenset({"uniform", "gaussian", "xavier", "msra"})
CHUNK = 1 << 20  # values drawn at a time by fill_into


def fill_into(out: np.ndarray, param, rng: np.random.Generator) -> None:
    """``out[...] = fill(out.shape, param, rng)``, with the same values, but without a float64
    array of ``out``'s size: independent draws are made ``CHUNK`` at a time into ``out`` (AlexNet's
    fc6 weights would otherwise pass through a 302 MB float64 array on their way to 151 MB)."""
    check_filler(param)
    if param.type == "constant" and not shape_only_active():
        out[...] = param.value
        return
    if (param.type not in _IID or param.sparse >= 0 or out.size <= CHUNK
            or not out.flags.c_contiguous or shape_only_active()):
        out[...] = fill(out.shape, param, rng)
        return
    FILLERS[param.type](out.shape, param, _ChunkedDraws(rng, out))


class _ChunkedDraws:
    """Stands in for the Generator in an iid filler: draws into ``out`` chunk by chunk, in the
    order one call for the whole shape would (a Generator's stream does not depend on how the
    draws are split), and returns ``out``."""

    def __init__(self, rng: np.random.Generator, out: np.ndarray) -> None:
        self.rng, self.out = rng, out

    def _draw(self, method, a: float, b: float) -> np.ndarray:
        flat = self.out.reshape(-1)
        for start in range(0, flat.size, CHUNK):
            flat[start:start + CHUNK] = method(a, b, min(CHUNK, flat.size - start))
        return self.out

    def uniform(self, low: float, high: float, size=None) -> np.ndarray:
        return self._draw(self.rng.uniform, low, high)

    def normal(self, loc: float, scale: float, size=None) -> np.ndarray:
        return self._draw(self.rng.normal, loc, scale)


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    count = float(np.prod(shape)) if shape else 1.0
    fan_in = count / shape[0] if shape and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _variance_n(shape: tuple[int, ...], param) -> float:
    fan_in, fan_out = _fans(shape)
    if param.variance_norm == FAN_OUT:
        return fan_out
    if param.variance_norm == AVERAGE:
        return (fan_in + fan_out) / 2.0
    return fan_in


@filler("constant")
def constant(shape, param, rng):
    return np.full(shape, param.value, np.float64)


@filler("uniform")
def uniform(shape, param, rng):
    return rng.uniform(param.min, param.max, shape)


@filler("gaussian")
def gaussian(shape, param, rng):
    values = rng.normal(param.mean, param.std, shape)
    if param.sparse >= 0:
        # keep each weight with probability sparse / num_outputs (Caffe: shape(0) outputs)
        num_outputs = shape[0] if shape else 1
        keep = rng.random(shape) < param.sparse / num_outputs
        values *= keep
    return values


@filler("positive_unitball")
def positive_unitball(shape, param, rng):
    values = rng.uniform(0.0, 1.0, shape)
    rows = values.reshape(shape[0] if shape else 1, -1)
    rows /= rows.sum(axis=1, keepdims=True)
    return values


@filler("xavier")
def xavier(shape, param, rng):
    """U(-a, a) with a = sqrt(3 / n): LeCun-uniform under the default FAN_IN."""
    scale = np.sqrt(3.0 / _variance_n(shape, param))
    return rng.uniform(-scale, scale, shape)


@filler("msra")
def msra(shape, param, rng):
    """N(0, sqrt(2 / n)) (He et al.)."""
    return rng.normal(0.0, np.sqrt(2.0 / _variance_n(shape, param)), shape)


@filler("bilinear")
def bilinear(shape, param, rng):
    """Bilinear-upsampling kernels for a Deconvolution layer; each K x K kernel is the same."""
    if len(shape) != 4 or shape[2] != shape[3]:
        raise NetError(f"the bilinear filler needs a 4-d blob with square kernels; got {shape}")
    k = shape[3]
    f = np.ceil(k / 2.0)
    c = (k - 1) / (2.0 * f)
    ramp = 1.0 - np.abs(np.arange(k) / f - c)
    return np.broadcast_to(np.outer(ramp, ramp), shape).copy()
