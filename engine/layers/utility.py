"""Utility layers: ``Silence``, ``Reduction`` (``reduction_param``), ``ArgMax``
(``argmax_param``), ``Filter``, ``BatchReindex`` and ``Parameter`` (``parameter_param``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine import caffe_pb2
from engine.blob import Blob
from engine.layer import Layer, register_layer

Op = caffe_pb2.ReductionParameter


@register_layer
class Silence(Layer):
    """Swallows any number of bottoms and has no tops (silences unused outputs).
    Backward writes zero bottom diffs, as Caffe's does.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (1, None)
    n_top = (0, 0)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        pass

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        for down, blob in zip(propagate_down, bottom, strict=False):
            if down:
                blob.diff[...] = 0


@register_layer
class Reduction(Layer):
    """Reduces every axis from ``axis`` on: with x viewed as (count(0..axis), count(axis..)),
    ``y_i = coeff * sum_j f(x_ij)``, f = x (SUM), |x| (ASUM), x^2 (SUMSQ), or x / dim (MEAN).
    Top shape: ``bottom.shape[:axis]`` (a scalar for axis 0, the default).
    Backward: ``coeff * dy_i * f'(x_ij)``; ASUM uses sign(x), 0 at 0, as Caffe's caffe_cpu_sign.
    """

    backward_needs_bottom_data = True
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        reduction_param = self.param.reduction_param
        self.operation = reduction_param.operation
        self.coeff = reduction_param.coeff
        try:
            self.axis = bottom[0].canonical_axis(reduction_param.axis)
        except ValueError as e:
            raise self.error(str(e)) from None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape(bottom[0].shape[:self.axis])
        self.dims = (bottom[0].count_axes(0, self.axis), bottom[0].count_axes(self.axis))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data.reshape(self.dims)
        if self.operation == Op.ASUM:
            total = np.abs(x).sum(axis=1)
        elif self.operation == Op.SUMSQ:
            total = np.einsum("ij,ij->i", x, x)
        else:
            total = x.sum(axis=1)
        top[0].data[...] = (self._scale() * total).reshape(top[0].shape)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        x = bottom[0].data.reshape(self.dims)
        dy = (self._scale() * top[0].diff).reshape(-1, 1)
        if self.operation == Op.ASUM:
            dx = np.sign(x) * dy
        elif self.operation == Op.SUMSQ:
            dx = 2 * x * dy
        else:
            dx = np.broadcast_to(dy, x.shape)
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)

    def _scale(self) -> float:
        """coeff, divided by the reduced size for MEAN (Caffe folds it into coeff_)."""
        if self.operation == Op.MEAN:
            return self.coeff / max(self.dims[1], 1)
        return self.coeff


@register_layer
class ArgMax(Layer):
    """The ``top_k`` largest entries, as indices (or values with ``out_max_val``).

    Without ``axis``: per item over the flattened count(1..); the top is (N, 1, top_k), or
    (N, 2, top_k) holding indices then values under ``out_max_val``, padded with trailing 1s
    to the bottom's number of axes (at least 3), as Caffe's. With ``axis``: the top is the
    bottom's shape with ``shape[axis] = top_k``, holding values under ``out_max_val``, else
    indices. Ties: Caffe sorts (value, index) pairs descending, so the **higher index wins**.
    Indices are written as floats. No gradient.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        argmax_param = self.param.argmax_param
        self.out_max_val = argmax_param.out_max_val
        self.top_k = argmax_param.top_k
        self.axis = None
        if argmax_param.HasField("axis"):
            try:
                self.axis = bottom[0].canonical_axis(argmax_param.axis)
            except ValueError as e:
                raise self.error(str(e)) from None
        if self.top_k < 1:
            raise self.error(f"top_k must be at least 1; got {self.top_k}")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        shape = bottom[0].shape
        if self.axis is None:
            dim = bottom[0].count_axes(1)
            out = [1] * max(len(shape), 3)
            out[0], out[2] = shape[0], self.top_k
            if self.out_max_val:
                out[1] = 2
            where = "the flattened item size"
        else:
            dim = shape[self.axis]
            out = list(shape)
            out[self.axis] = self.top_k
            where = f"the size of axis {self.axis}"
        if self.top_k > dim:
            raise self.error(f"top_k ({self.top_k}) must be at most {where} ({dim}) of "
                             f"the bottom {shape}")
        top[0].reshape(out)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        x = x.reshape(x.shape[0], -1) if self.axis is None else np.moveaxis(x, self.axis, -1)
        dim = x.shape[-1]
        # a stable descending sort of the reversed row puts the higher index first on ties
        order = np.argsort(-x[..., ::-1], axis=-1, kind="stable")[..., :self.top_k]
        index = dim - 1 - order
        value = np.take_along_axis(x, index, axis=-1)
        if self.axis is None:
            out = np.stack([index, value], axis=1) if self.out_max_val else index
            top[0].data[...] = out.reshape(top[0].shape)
        else:
            out = value if self.out_max_val else index
            top[0].data[...] = np.moveaxis(out, -1, self.axis)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if any(propagate_down):
            raise self.error("has no gradient (Caffe: not implemented)")


@register_layer
class Filter(Layer):
    """Keeps the items whose selector is nonzero. Bottoms: k blobs of N items each, then the
    selector (N values; dims after the first must be 1). Tops: k blobs (n_selected, ...).
    Caffe's quirk kept: the very first reshape (at net setup, before any data) sizes the tops
    for all N items. Backward scatters the top diffs back and zeroes the filtered-out items;
    the selector gets no gradient.
    """

    n_bottom = (2, None)
    n_top = (1, None)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        if len(top) != len(bottom) - 1:
            raise self.error(f"needs one top per filtered bottom ({len(bottom) - 1}); "
                             f"got {len(top)} tops")
        self.n_filtered = len(bottom) - 1
        self.first_reshape = True

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != self.n_filtered

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        selector = bottom[-1]
        if any(d != 1 for d in selector.shape[1:]) or selector.num_axes == 0:
            raise self.error(f"the selector (last bottom) must be N or N x 1 x ...; got "
                             f"{selector.shape}")
        for i, blob in enumerate(bottom[:-1]):
            if blob.num_axes == 0 or blob.shape[0] != selector.shape[0]:
                raise self.error(f"bottom {i} {blob.shape} must have the selector's "
                                 f"{selector.shape[0]} items along axis 0")
        self.indices = np.flatnonzero(selector.data.reshape(-1))
        n = len(self.indices)
        if self.first_reshape:
            n = selector.shape[0]
            self.first_reshape = False
        for blob, t in zip(bottom, top, strict=False):
            t.reshape((n, *blob.shape[1:]))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        n = len(self.indices)  # after the first reshape the tops may hold more rows
        for blob, t in zip(bottom, top, strict=False):
            t.data[:n] = blob.data[self.indices]

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if len(propagate_down) > self.n_filtered and propagate_down[self.n_filtered]:
            raise self.error("cannot backpropagate to the selector (last bottom)")
        n = len(self.indices)
        for down, blob, t in zip(propagate_down, bottom, top, strict=False):
            if down:
                blob.diff[...] = 0
                blob.diff[self.indices] = t.diff[:n]


@register_layer
class BatchReindex(Layer):
    """``top[i] = x[idx[i]]`` along the first axis. Bottoms: x (N, ...) and idx (M values in
    [0, N)). Top: (M, ...). Backward accumulates: items picked twice get both diffs, items
    never picked get 0. The indices get no gradient.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (2, 2)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if bottom[1].num_axes != 1:
            raise self.error(f"the index bottom must be 1-d; got {bottom[1].shape}")
        if bottom[0].num_axes == 0:
            raise self.error("bottom 0 must have a batch axis; got a scalar")
        top[0].reshape(bottom[1].shape[:1] + bottom[0].shape[1:])

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.index = bottom[1].data.astype(np.int64)
        n = bottom[0].shape[0]
        bad = (self.index < 0) | (self.index >= n)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise self.error(f"index {bottom[1].data[first]:g} at position {first} is outside "
                             f"[0, {n}) for bottom 0 {bottom[0].shape}")
        top[0].data[...] = bottom[0].data[self.index]

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("cannot backpropagate to the indices (bottom 1)")
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            np.add.at(bottom[0].diff, self.index, top[0].diff)


@register_layer
class Parameter(Layer):
    """A learnable blob of ``parameter_param.shape`` exposed as the top; no bottoms.
    Caffe shares data and diff between the blob and the top; here forward copies the data
    out and backward adds the top diff into the parameter diff. No filler: the blob starts
    at zero unless weights are loaded.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (0, 0)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.init_param_blobs([(tuple(self.param.parameter_param.shape.dim), None)])

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].data[...] = self.blobs[0].data

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        learn = self.param_propagate_down[0] if self.param_propagate_down else True
        if learn:
            self.blobs[0].diff += top[0].diff
