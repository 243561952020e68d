"""Numerical gradient checking for layers, after Caffe's GradientChecker.

The objective is ``L = sum_k <w_k, top_k>`` with fixed random weights ``w_k``, so each top diff
is ``w_k``. Every element of the checked bottoms and of every parameter blob is perturbed by
``±stepsize`` and the central difference is compared with the analytic gradient, within
``threshold * max(|analytic|, |numeric|, 1)``. Inputs within ``kink_range`` of ``kink`` (a
non-differentiable point, e.g. 0 for ReLU) are skipped. Run it in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer


def _forward(layer: Layer, bottom: list[Blob], top: list[Blob], weights, seed: int) -> float:
    layer.rng = np.random.default_rng(seed)  # the same random draws (dropout) every time
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return float(sum(np.sum(w * t.data) for w, t in zip(weights, top, strict=True)))


def check_gradient(
    layer: Layer,
    bottom: list[Blob],
    top: list[Blob],
    check_bottom: Sequence[int] | None = None,
    *,
    check_params: bool = True,
    stepsize: float = 1e-3,
    threshold: float = 1e-3,
    kink: float | None = None,
    kink_range: float = -1.0,
    seed: int = 1701,
) -> int:
    """Assert the layer's analytic gradients match central differences; returns #checked."""
    check_bottom = range(len(bottom)) if check_bottom is None else check_bottom
    weight_rng = np.random.default_rng(seed)
    layer.reshape(bottom, top)
    weights = [weight_rng.standard_normal(t.shape) for t in top]

    _forward(layer, bottom, top, weights, seed)
    for blob in layer.blobs:
        blob.diff[...] = 0
    for w, t in zip(weights, top, strict=True):
        t.diff[...] = w
    propagate = [i in check_bottom for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)

    targets = [(f"bottom[{i}]", bottom[i]) for i in check_bottom]
    if check_params:
        targets += [(f"param[{i}]", b) for i, b in enumerate(layer.blobs)]
    analytic = {name: blob.diff.copy() for name, blob in targets}

    checked = 0
    for name, blob in targets:
        flat = blob.data.reshape(-1)
        grad = analytic[name].reshape(-1)
        for j in range(flat.size):
            x = flat[j]
            if kink is not None and abs(x - kink) < kink_range:
                continue
            flat[j] = x + stepsize
            plus = _forward(layer, bottom, top, weights, seed)
            flat[j] = x - stepsize
            minus = _forward(layer, bottom, top, weights, seed)
            flat[j] = x
            numeric = (plus - minus) / (2 * stepsize)
            scale = max(abs(grad[j]), abs(numeric), 1.0)
            assert abs(grad[j] - numeric) <= threshold * scale, (
                f"{layer.type} '{layer.name}' {name} element {j}: analytic {grad[j]:.6g} "
                f"vs numeric {numeric:.6g}"
            )
            checked += 1
    _forward(layer, bottom, top, weights, seed)
    return checked
