"""How spatial coordinates move through a NetSpec: pycaffe's ``caffe.coord_map``.

The FCN examples use it to align an upsampled score map with the input before a ``Crop``:

    from engine.coord_map import crop
    n.upscore = L.Deconvolution(n.score, num_output=21, kernel_size=64, stride=32)
    n.score_crop = crop(n.upscore, n.data)      # a Crop layer with the right axis and offset

A coordinate map is a triple ``(axis, a, b)``: along the spatial axes after ``axis`` (None: any
axis), a coordinate ``x`` of a layer's bottom lands at ``a * x + b`` in its top. ``a`` and ``b``
are numpy arrays with one value per spatial axis (or one for all). For a layer with kernel
``k`` (dilated: ``(k - 1) * d + 1``), stride ``s`` and pad ``p``:

- Convolution (and the depthwise forks' types), Pooling, Im2col: ``a = 1 / s``,
  ``b = (p - (k - 1) / 2) / s`` (a top pixel sits at the centre of its window);
- Deconvolution: the inverse, ``a = s``, ``b = (k - 1) / 2 - p``;
- Crop by ``offset``: ``a = 1``, ``b = -offset`` (on the crop's axes);
- pointwise layers (ReLU, BatchNorm, Eltwise..., the forks' BN, ReLU6...): the identity
  ``(None, 1, 0)``.

Maps compose along a path (:func:`compose`) and invert (:func:`inverse`);
:func:`coord_map_from_to` walks the graph back from two tops to a common blob.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from engine.errors import MokaError
from engine.net_spec import Function, Top
from engine.net_spec import layers as L

__all__ = [
    "PASS_THROUGH_LAYERS",
    "AxisMismatchException",
    "CropError",
    "UndefinedMapException",
    "compose",
    "conv_params",
    "coord_map",
    "coord_map_from_to",
    "crop",
    "crop_params",
    "inverse",
]

CoordMap = tuple[Any, Any, Any]  # (axis or None, scale a, shift b)

# pycaffe's list, then the forks' pointwise types this engine runs (BN: SegNet/PSPNet, ReLU6 and
# ShuffleChannel: MobileNet/ShuffleNet, Normalize: SSD)
PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Clip", "Dropout", "Eltwise", "ELU",
                       "Exp", "Log", "LRN", "MVN", "Power", "PReLU", "ReLU", "Scale", "Sigmoid",
                       "Split", "Swish", "TanH", "Threshold",
                       "BN", "Normalize", "ReLU6", "ShuffleChannel"]
# Convolution's window geometry (conv_params): Caffe's types and the MobileNet forks' depthwise ones
WINDOW_LAYERS = ("Convolution", "Pooling", "Im2col", "DepthwiseConvolution",
                 "ConvolutionDepthwise")
IDENTITY: CoordMap = (None, 1, 0)


class UndefinedMapException(Exception):
    """The layer has no coordinate map (InnerProduct, global pooling, ...)."""


class AxisMismatchException(Exception):
    """Two maps along a path act on different axes."""


class CoordMapError(MokaError, RuntimeError):
    """No path of spatial layers joins the two tops."""


class CropError(MokaError, AssertionError):
    """:func:`crop` cannot align the tops (scales differ, or the offset is negative or
    fractional). An ``AssertionError`` as pycaffe's asserts are."""


def _spatial(value: Any, default: int) -> np.ndarray:
    empty = value is None or (isinstance(value, list | tuple) and not value)
    return np.array(default if empty else value, ndmin=1)


def conv_params(fn: Function) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(axis, stride, effective kernel size, pad)`` of a Convolution, Deconvolution, Im2col or
    Pooling Function, from its keyword arguments (top level or ``convolution_param=``)."""
    params = fn.params.get("convolution_param", fn.params)
    if fn.type_name == "Pooling":
        params = fn.params.get("pooling_param", fn.params)
        if params.get("global_pooling"):
            raise UndefinedMapException(f"{fn.type_name} with global_pooling has no coord map")
    axis = int(params.get("axis", 1))
    if "kernel_h" in params or "kernel_w" in params:
        kernel = np.array([params["kernel_h"], params["kernel_w"]], ndmin=1)
    elif "kernel_size" in params:
        kernel = np.array(params["kernel_size"], ndmin=1)
    else:
        raise UndefinedMapException(f"{fn.type_name} without a kernel size")
    stride = (np.array([params.get("stride_h", 1), params.get("stride_w", 1)])
              if "stride_h" in params or "stride_w" in params
              else _spatial(params.get("stride"), 1))
    pad = (np.array([params.get("pad_h", 0), params.get("pad_w", 0)])
           if "pad_h" in params or "pad_w" in params else _spatial(params.get("pad"), 0))
    dilation = _spatial(params.get("dilation"), 1)
    return axis, stride, (kernel - 1) * dilation + 1, pad


def crop_params(fn: Function) -> tuple[int, np.ndarray]:
    """``(axis, offset)`` of a Crop Function (Caffe's defaults: axis 2, offset 0)."""
    params = fn.params.get("crop_param", fn.params)
    return int(params.get("axis", 2)), _spatial(params.get("offset"), 0)


def coord_map(fn: Function) -> CoordMap:
    """The map from a layer's (first) bottom to its tops; see the module docstring."""
    if fn.type_name in WINDOW_LAYERS:
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return IDENTITY
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # the crop axis is the first spatial one
    raise UndefinedMapException(f"no coordinate map for {fn.type_name} layers")


def compose(base_map: CoordMap, next_map: CoordMap) -> CoordMap:
    """``base_map`` after ``next_map``: x → a1 * (a2 * x + b2) + b1."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        axis = ax2
    elif ax2 is None or ax1 == ax2:
        axis = ax1
    else:
        raise AxisMismatchException(f"maps on axis {ax1} and axis {ax2} do not compose")
    return axis, a1 * a2, a1 * b2 + b1


def inverse(coord_map: CoordMap) -> CoordMap:
    """The map back: x → (x - b) / a."""
    axis, a, b = coord_map
    return axis, 1 / a, -b / a


def _mapped_bottoms(top: Top) -> tuple[Top, ...]:
    """The bottoms whose coordinates a top's map covers (Crop: only the cropped one)."""
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def _walk(start: Top) -> Iterator[tuple[Top, CoordMap]]:
    """Every top reachable backwards from ``start`` through mappable layers, nearest first,
    with the map from its coordinates to ``start``'s."""
    maps: dict[Top, CoordMap] = {start: IDENTITY}
    frontier = deque([start])
    while frontier:
        top = frontier.popleft()
        yield top, maps[top]
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mapped_bottoms(top):
            if bottom not in maps:
                maps[bottom] = compose(maps[top], step)
                frontier.append(bottom)


def coord_map_from_to(top_from: Top, top_to: Top) -> CoordMap:
    """The map taking ``top_from``'s coordinates to ``top_to``'s, through the blob nearest
    ``top_to`` that both are computed from: ``x_to = a * x_from + b``."""
    from_maps = dict(_walk(top_from))
    for top, to_map in _walk(top_to):
        if top in from_maps:
            return compose(to_map, inverse(from_maps[top]))
    raise CoordMapError("Could not compute map between tops; are they connected by spatial "
                        "layers?")


def crop(top_from: Top, top_to: Top) -> Top:
    """A Crop layer cutting ``top_from`` to ``top_to``'s extent where their coordinates align
    (``axis`` and ``offset`` from :func:`coord_map_from_to`)."""
    axis, a, b = coord_map_from_to(top_from, top_to)
    a, b = np.asarray(a), np.asarray(b)
    if not (a == 1).all():
        raise CropError(f"scale mismatch on crop (a = {a})")
    if not (b <= 0).all():
        raise CropError(f"cannot crop negative offset (b = {b})")
    if not (np.round(b) == b).all():
        raise CropError(f"cannot crop noninteger offset (b = {b})")
    offset = [int(v) for v in -np.round(b).astype(int)]
    axis = 1 if axis is None else axis  # only pointwise layers between: crop the spatial axes
    return L.Crop(top_from, top_to, crop_param=dict(axis=axis + 1, offset=offset))
