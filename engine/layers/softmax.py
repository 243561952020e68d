"""Softmax layers: ``Softmax`` and ``SoftmaxWithLoss`` (``softmax_param``; the loss also reads
``loss_param``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, LossLayer, NeuronLayer, register_layer
from engine.layers.loss import (
    no_label_gradient,
    normalization_mode,
    normalizer,
    read_labels,
    top_scale,
)

FLT_MIN = np.finfo(np.float32).tiny  # Caffe clamps with FLT_MIN even in double precision


def split_axis(layer: Layer, blob: Blob, axis: int) -> tuple[int, int, int]:
    """``(outer, channels, inner)``: ``blob`` seen as a 3-d array around ``axis``."""
    try:
        axis = blob.canonical_axis(axis)
    except ValueError as exc:
        raise layer.error(str(exc)) from None
    return blob.count_axes(0, axis), blob.shape[axis], blob.count_axes(axis + 1)


def split_scores(layer: Layer, bottom: list[Blob], axis: int) -> tuple[int, int, int]:
    """``split_axis`` of the scores ``bottom[0]``, checking ``bottom[1]`` has one label for
    every (outer, inner) position."""
    outer, classes, inner = split_axis(layer, bottom[0], axis)
    if bottom[1].count != outer * inner:
        raise layer.error(
            f"the labels must have one value per prediction: scores {bottom[0].shape} with "
            f"axis {axis} need {outer * inner} labels (outer {outer} x inner {inner}), "
            f"but the label blob {bottom[1].shape} has {bottom[1].count}"
        )
    return outer, classes, inner


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of an ``(outer, channels, inner)`` array, in its dtype."""
    e = np.exp(x - x.max(axis=1, keepdims=True))  # shifting by the max keeps exp finite
    e /= e.sum(axis=1, keepdims=True)
    return e


@register_layer
class Softmax(NeuronLayer):
    """``y = exp(x - max) / sum(exp(x - max))`` along ``axis`` (default 1, negative counts from
    the end), independently at every other position. Shape: top = bottom. Safe in place.

    Backward: ``dx = (dy - sum(dy * y over axis)) * y``.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = True

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.axis = self.param.softmax_param.axis

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        self.dims = split_axis(self, bottom[0], self.axis)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        y = softmax(bottom[0].data.reshape(self.dims))
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if not propagate_down[0]:
            return
        y = top[0].data.reshape(self.dims)  # in place, bottom data already holds y
        dy = top[0].diff.reshape(self.dims)
        dx = (dy - np.sum(dy * y, axis=1, keepdims=True)) * y
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)


@register_layer
class SoftmaxWithLoss(LossLayer):
    """Multinomial logistic loss of the softmax of bottom 0 (scores) against bottom 1 (labels).

    ``loss = -sum log(max(p[label], FLT_MIN)) / normalizer`` over the ``outer x inner``
    positions around ``softmax_param.axis``; labels ``== loss_param.ignore_label`` are skipped.
    Normalizer (``loss_param.normalization``): FULL = outer*inner, VALID = non-ignored count
    (default), BATCH_SIZE = outer, NONE = 1, clamped to >= 1; the legacy ``normalize`` flag
    (true = VALID, false = BATCH_SIZE) counts only when ``normalization`` is unset.
    Shapes: scores (..., C, ...), labels with outer*inner elements (read as int, truncated);
    top 0 a scalar, optional top 1 the probabilities (shape of the scores, loss weight 0, and,
    as in Caffe, no gradient flows back from it). A saturated loss is -ln(FLT_MIN) = 87.3365.
    Backward: ``(p - onehot(label)) * top_diff / normalizer``, zero at ignored positions.

    SegNet/ENet forks: ``loss_param { weight_by_label_freqs: true class_weighting: w_0 ... }``
    (one weight per class) multiplies each position's loss and gradient by ``w[label]``; the
    normalizer still counts positions, not weights, as the forks do.
    """

    n_top = (1, 2)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.axis = self.param.softmax_param.axis
        loss_param = self.param.loss_param
        self.ignore_label = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
        self.normalization = normalization_mode(loss_param, loss_param.normalization)
        self.class_weights = np.array(loss_param.class_weighting, np.float64) \
            if loss_param.weight_by_label_freqs else None

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        self.dims = split_scores(self, bottom, self.axis)
        if self.class_weights is not None and self.class_weights.size != self.dims[1]:
            raise self.error(f"weight_by_label_freqs needs one class_weighting value per class "
                             f"({self.dims[1]}); got {self.class_weights.size}")
        if len(top) > 1:
            top[1].reshape(bottom[0].shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        outer, _, inner = self.dims
        self.prob = softmax(bottom[0].data.reshape(self.dims))
        self.labels, self.valid = read_labels(self, bottom[1], (outer, inner), self.dims[1],
                                              self.ignore_label)
        p_true = np.take_along_axis(self.prob, self.labels[:, None, :], axis=1)[:, 0, :]
        log_p = np.log(np.maximum(p_true, self.prob.dtype.type(FLT_MIN)))
        self.weights = None
        if self.class_weights is not None:
            self.weights = self.class_weights.astype(log_p.dtype)[self.labels]
            log_p = log_p * self.weights
        self.norm = normalizer(self.normalization, outer, inner, int(self.valid.sum()))
        top[0].data[...] = -np.sum(log_p, where=self.valid) / self.norm
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(top[1].shape)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        no_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        scale = top_scale(top, self.norm)
        diff = self.prob * scale
        rows, cols = np.nonzero(self.valid)
        diff[rows, self.labels[rows, cols], cols] -= scale
        if self.weights is not None:
            diff *= self.weights[:, None, :]
        if self.ignore_label is not None:
            diff *= self.valid[:, None, :]
        bottom[0].diff[...] = diff.reshape(bottom[0].shape)

