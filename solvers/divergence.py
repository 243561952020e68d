"""Divergence: notice a NaN/Inf cheaply every iteration, then name the layer that made it.

Every iteration the solver checks the loss and the parameter gradients (``gradients_finite``:
one pass over the parameters, far cheaper than the forward and backward that made them) and,
after the update, the parameters themselves. Only when something is non-finite does
``diagnose`` look closer: it runs the same batch again layer by layer (the data layers are not
run again, so their tops keep the batch) and checks each layer's tops in forward order, then each
layer's bottom and parameter gradients in backward order, and names the first layer whose output
or gradient went bad. If that re-run stays finite (a random layer drew differently), the
blobs as the failing pass left them are searched instead.
"""

from __future__ import annotations

import math

import numpy as np

from engine.errors import SolverError


class DivergenceError(SolverError):
    """Training produced a NaN or Inf; the message names the layer and the iteration."""


def finite(values: np.ndarray) -> bool:
    """Whether every value is finite: first a dot product with itself (one vectorised pass, no
    temporary; NaN and Inf carry through a sum), and only when that is not finite, which an
    overflow of finite squares can also cause, value by value."""
    flat = values.reshape(-1)
    return bool(np.isfinite(np.dot(flat, flat))) or bool(np.isfinite(values).all())


def gradients_finite(net) -> bool:
    return all(finite(blob.diff) for blob in net.learnable_params)


def params_finite(net) -> bool:
    return all(finite(blob.data) for blob in net.learnable_params)


def _bad_top(net, i: int) -> str | None:
    layer = net.layers[i]
    for name, blob in zip(net.top_names[layer.name], net.top_vecs[i], strict=True):
        if not finite(blob.data):
            return name
    return None


def _describe_inputs(net, i: int) -> str:
    layer = net.layers[i]
    bad_params = [str(j) for j, blob in enumerate(layer.blobs) if not finite(blob.data)]
    if bad_params:
        return f"its param blob(s) {', '.join(bad_params)} are already non-finite"
    bottoms = net.bottom_names[layer.name]
    if any(not finite(blob.data) for blob in net.bottom_vecs[i]):
        return f"its bottoms {bottoms} were already non-finite"
    if layer.blobs:
        largest = max(float(np.abs(blob.data).max(initial=0.0)) for blob in layer.blobs)
        return f"from finite bottoms and params; its largest |param| is {largest:.3g}"
    return "from finite bottoms"


# The scans step through the layers as Net.forward_from_to / backward_from_to do, but without
# the net's per-layer callbacks and debug lines: a diagnosis must not fire user (or MPI) hooks.
def _forward_scan(net, rerun: bool) -> str | None:
    for i, layer in enumerate(net.layers):
        bottoms = net.bottom_vecs[i]
        if rerun and bottoms:  # a source layer keeps the batch it produced
            layer.reshape(bottoms, net.top_vecs[i])
            net._in_place.copy_values(i)  # in-place chains' saved values
            layer.forward(bottoms, net.top_vecs[i])
        top = _bad_top(net, i)
        if top is not None:
            return (f"the forward of layer '{layer.name}' ({layer.type}) made top blob "
                    f"'{top}' non-finite ({_describe_inputs(net, i)})")
    return None


def _backward_scan(net) -> str | None:
    net.clear_param_diffs()
    net._seed_loss_diffs()
    for i in reversed(range(len(net.layers))):
        if not net.layer_need_backward[i]:
            continue
        layer = net.layers[i]
        top, bottom = net._in_place.backward_vecs(i, net.top_vecs[i], net.bottom_vecs[i])
        layer.backward(top, net.bottom_need_backward[i], bottom)
        names = net.bottom_names[layer.name]
        for name, blob, need in zip(names, net.bottom_vecs[i], net.bottom_need_backward[i],
                                    strict=True):
            if need and not finite(blob.diff):
                return (f"the backward of layer '{layer.name}' ({layer.type}) made the "
                        f"gradient of bottom blob '{name}' non-finite")
        for j, blob in enumerate(layer.blobs):
            if not finite(blob.diff):
                return (f"the backward of layer '{layer.name}' ({layer.type}) made the "
                        f"gradient of its param blob {j} non-finite")
    return None


def diagnose(net) -> str:
    """The first layer (forward order, then backward) whose output or gradient is non-finite.

    Call it when the loss or a gradient went non-finite, before the update: it re-runs the
    batch (changing the blobs, the parameter gradients and any random stream), so training
    must stop afterwards.
    """
    as_left = _forward_scan(net, rerun=False)
    found = _forward_scan(net, rerun=True) or _backward_scan(net)
    if found:
        return found
    if as_left:
        return as_left + " (a re-run of the batch stayed finite: a random layer may be involved)"
    return ("no layer's output or gradient was non-finite when the batch was run again (a "
            "random layer may be involved)")


def update_culprit(net, owners: list[tuple[str, str]]) -> str:
    """The first parameter whose values the update made non-finite."""
    for k, blob in enumerate(net.learnable_params):
        if not finite(blob.data):
            layer, param = owners[k]
            return f"the update made param {param} of layer '{layer}' non-finite"
    return "the update made a parameter non-finite"


def describe_loss(loss: float) -> str:
    return f"loss = {loss:g}" if math.isfinite(loss) else f"loss = {loss}"
