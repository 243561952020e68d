"""Loss layers: ``EuclideanLoss``, ``SigmoidCrossEntropyLoss`` (``loss_param``), ``HingeLoss``
(``hinge_loss_param``) and ``MultinomialLogisticLoss``; plus the label reading and the
``loss_param`` normalisation that ``SoftmaxWithLoss`` shares.

Every loss writes a scalar top 0. Its loss weight reaches ``backward`` as ``top[0].diff``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine import caffe_pb2
from engine.blob import Blob
from engine.layer import Layer, LossLayer, register_layer

Norm = caffe_pb2.LossParameter


def normalization_mode(loss_param: caffe_pb2.LossParameter, default: int) -> int:
    """Caffe's rule: ``normalization`` if set, else the legacy ``normalize`` flag
    (true = VALID, false = BATCH_SIZE), else ``default``."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return Norm.VALID if loss_param.normalize else Norm.BATCH_SIZE
    return default


def normalizer(mode: int, outer: int, inner: int, valid: int) -> float:
    """What the summed loss is divided by; at least 1 so an all-ignored batch gives 0, not NaN."""
    by_mode = {Norm.FULL: outer * inner, Norm.VALID: valid, Norm.BATCH_SIZE: outer, Norm.NONE: 1}
    return float(max(1, by_mode[mode]))


def read_labels(layer: Layer, blob: Blob, shape: tuple[int, ...], classes: int,
                ignore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer labels as an array of ``shape`` and the mask of those that are not ``ignore``.

    Ignored positions get label 0 so that they index safely; every other label must lie in
    ``[0, classes)``.
    """
    labels = blob.data.reshape(shape).astype(np.int64)  # truncates, as static_cast<int>
    valid = labels != ignore if ignore is not None else np.ones(labels.shape, bool)
    bad = valid & ((labels < 0) | (labels >= classes))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise layer.error(
            f"label {labels.flat[first]} at position {first} of the label blob {blob.shape} is "
            f"outside [0, {classes}) for {classes} classes"
            + ("" if ignore is None else f" and is not the ignore_label {ignore}")
        )
    return np.where(valid, labels, 0), valid


def top_scale(top: list[Blob], norm: float) -> np.generic:
    """The loss weight (top 0's diff) over the normaliser, in the blob's dtype."""
    return top[0].diff.reshape(-1)[0] / norm


def check_one_label_per_item(layer: Layer, bottom: list[Blob]) -> None:
    if bottom[1].count != bottom[0].num:
        raise layer.error(f"needs one label per item: scores {bottom[0].shape} need "
                          f"{bottom[0].num} labels, the label blob {bottom[1].shape} "
                          f"has {bottom[1].count}")


def no_label_gradient(layer: Layer, propagate_down: Sequence[bool]) -> None:
    if len(propagate_down) > 1 and propagate_down[1]:
        raise layer.error("cannot backpropagate to the labels (bottom 1)")


@register_layer
class EuclideanLoss(LossLayer):
    """``loss = sum((a - b)^2) / (2N)``, N = a.shape[0]. Shapes: a and b with the same count
    per item. Backward reaches both bottoms: ``+-(a - b) * top_diff / N``; unlike other losses,
    bottom 1 may receive a gradient (Caffe's AllowForceBackward is true for both).
    """

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(f"the two bottoms must have the same count; got {bottom[0].shape} "
                             f"and {bottom[1].shape}")

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.diff = bottom[0].data - bottom[1].data.reshape(bottom[0].shape)
        flat = self.diff.reshape(-1)
        top[0].data[...] = (flat @ flat) / bottom[0].num / 2

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        for i, sign in enumerate((1, -1)):
            if propagate_down[i]:
                alpha = sign * top_scale(top, bottom[i].num)
                bottom[i].diff[...] = (alpha * self.diff).reshape(bottom[i].shape)


@register_layer
class SigmoidCrossEntropyLoss(LossLayer):
    """Cross-entropy of targets t in [0, 1] against sigmoid(x), in Caffe's stable form:
    ``loss_i = -(x (t - [x >= 0]) - log(1 + exp(x - 2x [x >= 0])))``, summed over positions
    whose int(t) is not ``loss_param.ignore_label`` and divided by the normaliser (as for
    SoftmaxWithLoss with outer = N, inner = count / N, but the default is **BATCH_SIZE**).
    Shapes: x and t of the same count. Backward: ``(sigmoid(x) - t) * top_diff / normaliser``,
    zero at ignored positions.
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        loss_param = self.param.loss_param
        self.ignore_label = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
        self.normalization = normalization_mode(loss_param, Norm.BATCH_SIZE)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(f"scores and targets must have the same count; got "
                             f"{bottom[0].shape} and {bottom[1].shape}")

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        # Caffe's stable form: log(1 + exp(x - 2x[x >= 0])) = log1p(exp(-|x|)) never overflows
        loss = x * (t - (x >= 0)) - np.log1p(np.exp(-np.abs(x)))
        self.valid = np.ones(x.shape, bool)
        if self.ignore_label is not None:
            self.valid = t.astype(np.int64) != self.ignore_label  # int(t), as Caffe compares
        outer = bottom[0].num
        self.norm = normalizer(self.normalization, outer, x.size // max(outer, 1),
                               int(self.valid.sum()))
        top[0].data[...] = -np.sum(loss, where=self.valid) / self.norm
        self.sigmoid = 0.5 * np.tanh(0.5 * x) + 0.5  # Caffe's Sigmoid layer formula

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        no_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        diff = self.sigmoid - bottom[1].data.reshape(self.sigmoid.shape)
        if self.ignore_label is not None:
            diff *= self.valid
        bottom[0].diff[...] = diff * top_scale(top, self.norm)


@register_layer
class HingeLoss(LossLayer):
    """One-vs-all hinge loss. With t = +1 for the labelled class and -1 for the others,
    ``h = max(0, 1 - t x)``; ``loss = sum(h) / N`` (``hinge_loss_param.norm`` L1, default) or
    ``sum(h^2) / N`` (L2). Shapes: scores (N, ...) flattened to (N, D); labels N values.
    Backward: L1 ``-t sign(h) / N``, L2 ``-2 t h / N``, times top_diff.
    """

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.squared = self.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        check_one_label_per_item(self, bottom)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        n = bottom[0].num
        x = bottom[0].data.reshape(n, -1)
        labels, _ = read_labels(self, bottom[1], (n,), x.shape[1])
        self.rows = (np.arange(n), labels)
        t_x = -x  # -t x for every class but the labelled one ...
        t_x[self.rows] = x[self.rows]  # ... where t = +1
        self.hinge = np.maximum(1 - t_x, 0)
        total = np.sum(self.hinge * self.hinge) if self.squared else np.sum(self.hinge)
        top[0].data[...] = total / n

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        no_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        grad = 2 * self.hinge if self.squared else np.sign(self.hinge)
        grad[self.rows] *= -1  # d h / d x = -t where h > 0
        grad *= top_scale(top, bottom[0].num)
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register_layer
class MultinomialLogisticLoss(LossLayer):
    """``loss = -sum_n log(max(p[n, label_n], 1e-20)) / N`` for probabilities p (N, ...)
    flattened to (N, D) and N labels. Backward: ``-top_diff / (N max(p, 1e-20))`` at the
    labelled entries, 0 elsewhere.
    """

    threshold = 1e-20  # Caffe's kLOG_THRESHOLD

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        check_one_label_per_item(self, bottom)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        n = bottom[0].num
        p = bottom[0].data.reshape(n, -1)
        labels, _ = read_labels(self, bottom[1], (n,), p.shape[1])
        self.rows = (np.arange(n), labels)
        self.p_true = np.maximum(p[self.rows], p.dtype.type(self.threshold))
        top[0].data[...] = -np.sum(np.log(self.p_true)) / n

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        no_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        n = bottom[0].num
        grad = np.zeros((n, bottom[0].count // max(n, 1)), bottom[0].diff.dtype)
        grad[self.rows] = -top_scale(top, n) / self.p_true
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)
