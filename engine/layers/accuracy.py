"""``Accuracy`` (``accuracy_param``): top-k classification accuracy, not a loss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob
from engine.layer import Layer, register_layer
from engine.layers.loss import read_labels
from engine.layers.softmax import split_scores


@register_layer
class Accuracy(Layer):
    """Fraction of positions whose label is among the ``top_k`` highest scores.

    Scores (..., C, ...) with the classes on ``axis`` (default 1); labels with one value per
    other position (read as int, truncated). As in Caffe, a position counts as correct iff
    fewer than ``top_k`` *other* classes score ``>=`` the true class, so ties count against
    it. Labels equal to ``ignore_label`` leave the denominator; if every label is ignored the
    accuracy is 0. Top 0: a scalar; optional top 1: per-class accuracy, shape (C,), 0 for a
    class with no labels. No gradient.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False

    n_bottom = (2, 2)
    n_top = (1, 2)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        accuracy_param = self.param.accuracy_param
        self.top_k = accuracy_param.top_k
        self.axis = accuracy_param.axis
        self.ignore_label = (accuracy_param.ignore_label
                             if accuracy_param.HasField("ignore_label") else None)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False  # so force_backward nets skip it rather than fail in backward

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        self.dims = split_scores(self, bottom, self.axis)
        classes = self.dims[1]
        if self.top_k > classes:
            raise self.error(f"top_k ({self.top_k}) must be at most the number of classes "
                             f"({classes}, the size of axis {self.axis} of {bottom[0].shape})")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((classes,))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        outer, classes, inner = self.dims
        scores = bottom[0].data.reshape(self.dims)
        labels, valid = read_labels(self, bottom[1], (outer, inner), classes, self.ignore_label)
        true_score = np.take_along_axis(scores, labels[:, None, :], axis=1)
        at_least_as_good = np.count_nonzero(scores >= true_score, axis=1)  # counts itself
        correct = valid & (at_least_as_good - 1 < self.top_k)
        n_valid = int(valid.sum())
        top[0].data[...] = correct.sum() / n_valid if n_valid else 0
        if len(top) > 1:
            per_class = np.bincount(labels[valid], minlength=classes)
            hits = np.bincount(labels[correct], minlength=classes)
            top[1].data[...] = np.where(per_class > 0, hits / np.maximum(per_class, 1), 0)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if any(propagate_down):
            raise self.error("has no gradient (Caffe: not implemented); it cannot be "
                             "backpropagated through")
