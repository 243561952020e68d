"""``debug_info: true``: Caffe's per-layer data and diff norms, in Caffe's exact line shapes.

Each number is the blob's mean absolute value (``asum / count``), as Caffe's
``Net::ForwardDebugInfo``, ``BackwardDebugInfo`` and ``UpdateDebugInfo`` print it::

        [Forward] Layer conv1, top blob conv1 data: 0.123
        [Forward] Layer conv1, param blob 0 data: 0.0456
        [Backward] Layer conv1, bottom blob data diff: 0.00012
        [Backward] Layer conv1, param blob 0 diff: 0.0031
        [Backward] All net params (data, diff): L1 norm = (12.3, 0.45); L2 norm = (1.2, 0.03)
        [Update] Layer conv1, param 0 data: 0.0456; diff: 3.1e-05

A param is shown by its ``param { name }`` when it has one, else by its index in the layer
(Caffe's ``param_display_names_``); the backward lines use the index, as Caffe's do. The net
calls ``forward``/``backward``/``all_params`` when ``Net.debug_info`` is on; the solver turns it
on for display iterations (as Caffe) and calls ``update`` before applying each step.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger("engine.net")


def mean_abs(values: np.ndarray) -> float:
    """``asum / count`` (0 for an empty blob)."""
    return float(np.abs(values).sum(dtype=np.float64)) / values.size if values.size else 0.0


def _g(value: float) -> str:
    """A number as C++'s ostream prints it (6 significant digits; nan, inf as glibc spells them)."""
    if math.isnan(value):
        return "nan" if math.copysign(1.0, value) > 0 else "-nan"
    return f"{value:g}"


def param_display_name(net, layer_index: int, j: int) -> str:
    specs = net._layer_params[layer_index].param
    return specs[j].name if j < len(specs) and specs[j].name else str(j)


def forward(net, i: int) -> None:
    """Caffe's ForwardDebugInfo for layer ``i``: every top's data, then every param's data."""
    layer = net.layers[i]
    for name, blob in zip(net.top_names[layer.name], net.top_vecs[i], strict=True):
        log.info("    [Forward] Layer %s, top blob %s data: %s", layer.name, name,
                 _g(mean_abs(blob.data)))
    for j, blob in enumerate(layer.blobs):
        log.info("    [Forward] Layer %s, param blob %s data: %s", layer.name,
                 param_display_name(net, i, j), _g(mean_abs(blob.data)))


def backward(net, i: int) -> None:
    """Caffe's BackwardDebugInfo: the diffs of the bottoms and params that got one."""
    layer = net.layers[i]
    names = net.bottom_names[layer.name]
    for name, blob, need in zip(names, net.bottom_vecs[i], net.bottom_need_backward[i],
                                strict=True):
        if need:
            log.info("    [Backward] Layer %s, bottom blob %s diff: %s", layer.name, name,
                     _g(mean_abs(blob.diff)))
    for j, blob in enumerate(layer.blobs):
        if j < len(layer.param_propagate_down) and layer.param_propagate_down[j]:
            log.info("    [Backward] Layer %s, param blob %d diff: %s", layer.name, j,
                     _g(mean_abs(blob.diff)))


def all_params(net) -> None:
    """Caffe's summary after a whole backward (logged at ERROR, as Caffe does)."""
    asum_data = asum_diff = sumsq_data = sumsq_diff = 0.0
    for blob in net.learnable_params:
        asum_data += float(np.abs(blob.data).sum(dtype=np.float64))
        asum_diff += float(np.abs(blob.diff).sum(dtype=np.float64))
        sumsq_data += float(np.square(blob.data, dtype=np.float64).sum())
        sumsq_diff += float(np.square(blob.diff, dtype=np.float64).sum())
    log.error("    [Backward] All net params (data, diff): L1 norm = (%s, %s); L2 norm = (%s, "
              "%s)", _g(asum_data), _g(asum_diff), _g(math.sqrt(sumsq_data)),
              _g(math.sqrt(sumsq_diff)))


def learnable_owners(net) -> list[tuple[str, str]]:
    """(layer name, param display name) of every learnable param, in learnable order."""
    index = {id(blob): k for k, blob in enumerate(net.learnable_params)}
    owners: list[tuple[str, str]] = [("?", str(k)) for k in range(len(index))]
    for i, layer in enumerate(net.layers):
        for j, blob in enumerate(layer.blobs):
            k = index.get(id(blob))
            if k is not None:
                owners[k] = (layer.name, param_display_name(net, i, j))
    return owners


def update(owner: tuple[str, str], data: np.ndarray, step: np.ndarray) -> None:
    """Caffe's UpdateDebugInfo for one learnable param, ``owner`` its entry in
    :func:`learnable_owners`: its data and the step about to be applied (the diff Caffe's
    update subtracts)."""
    layer_name, display = owner
    log.info("    [Update] Layer %s, param %s data: %s; diff: %s", layer_name, display,
             _g(mean_abs(data)), _g(mean_abs(step)))
