"""Metric losses: ``ContrastiveLoss`` (``contrastive_loss_param``) and ``InfogainLoss``
(``infogain_loss_param``, ``loss_param``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.blob import Blob, blob_proto_array, blob_proto_shape
from engine.errors import MokaError
from engine.io import read_blob_proto
from engine.layer import LossLayer, register_layer
from engine.layers.loss import normalizer, read_labels, top_scale
from engine.layers.softmax import softmax, split_scores


@register_layer
class ContrastiveLoss(LossLayer):
    """Siamese-pair loss. Bottoms: a and b (N, C...) flattened to (N, C), y (N values; int(y)
    nonzero means similar). With d = ||a_n - b_n||:
    ``loss = 1/(2N) sum_n [ y d^2 + (1 - y) max(margin - d, 0)^2 ]``, or with
    ``legacy_version`` ``max(margin - d^2, 0)`` (not squared) for dissimilar pairs.
    Backward to a (b gets the negative): similar ``(a - b) / N``; dissimilar, where the hinge
    is active, ``-(margin - d) / (d + 1e-4) (a - b) / N`` (Caffe's 1e-4 guards d = 0) or, legacy,
    ``-(a - b) / N``; all times the loss weight. y gets no gradient.
    """

    n_bottom = (3, 3)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        contrastive_param = self.param.contrastive_loss_param
        self.margin = contrastive_param.margin
        self.legacy = contrastive_param.legacy_version

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        a, b, y = bottom
        if a.count != b.count:
            raise self.error(f"a and b (bottoms 0 and 1) must have the same shape; got "
                             f"{a.shape} and {b.shape}")
        if y.count != a.num:
            raise self.error(f"needs one similarity label per pair: {a.num} pairs, the label "
                             f"blob {y.shape} has {y.count} values")

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        n = bottom[0].num
        self.diff = bottom[0].data.reshape(n, -1) - bottom[1].data.reshape(n, -1)
        self.dist_sq = np.einsum("ij,ij->i", self.diff, self.diff)
        self.similar = bottom[2].data.reshape(-1).astype(np.int64) != 0
        if self.legacy:
            apart = np.maximum(self.margin - self.dist_sq, 0)
        else:
            apart = np.maximum(self.margin - np.sqrt(self.dist_sq), 0) ** 2
        loss = np.where(self.similar, self.dist_sq, apart)
        top[0].data[...] = loss.sum() / n / 2

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if len(propagate_down) > 2 and propagate_down[2]:
            raise self.error("cannot backpropagate to the similarity labels (bottom 2)")
        if self.legacy:
            mdist = self.margin - self.dist_sq
            beta = -np.ones_like(self.dist_sq)
        else:
            dist = np.sqrt(self.dist_sq)
            mdist = self.margin - dist
            beta = -mdist / (dist + 1e-4)
        row_scale = np.where(self.similar, 1, np.where(mdist > 0, beta, 0))
        grad = row_scale[:, None] * self.diff
        for i, sign in enumerate((1, -1)):
            if propagate_down[i]:
                alpha = sign * top_scale(top, bottom[i].num)
                bottom[i].diff[...] = (alpha * grad).reshape(bottom[i].shape)


@register_layer
class InfogainLoss(LossLayer):
    """Softmax, then the infogain-weighted log loss (Caffe's current form):
    ``p = softmax(x)`` along ``axis``; ``loss = -sum_pos sum_l H[label, l] log(max(p_l, 1e-20))``
    over positions whose label is not ``loss_param.ignore_label``, divided by the
    ``loss_param.normalization`` normaliser (default VALID; the legacy ``normalize`` is
    rejected, as in Caffe). H (L x L, L = the size of ``axis``) comes from
    ``infogain_loss_param.source`` (a .binaryproto) or a third bottom. Shapes: scores
    (outer, L, inner), one label per (outer, inner) position. Optional top 1: the softmax p.
    Backward: ``(p_l sum_k H[label, k] - H[label, l]) * loss_weight / normaliser``, 0 at
    ignored positions. Labels and H get no gradient. H = identity gives SoftmaxWithLoss.
    """

    n_bottom = (2, 3)
    n_top = (1, 2)
    threshold = 1e-20  # Caffe's kLOG_THRESHOLD

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        loss_param = self.param.loss_param
        if loss_param.HasField("normalize"):
            raise self.error("loss_param.normalize is deprecated for InfogainLoss; use "
                             "normalization (FULL, VALID, BATCH_SIZE or NONE)")
        self.normalization = loss_param.normalization
        self.ignore_label = loss_param.ignore_label if loss_param.HasField("ignore_label") else None
        self.axis = self.param.infogain_loss_param.axis
        self.stored_h = None
        if len(bottom) < 3:
            self.stored_h = self._read_h(self.param.infogain_loss_param)

    def _read_h(self, infogain_param) -> np.ndarray:
        if not infogain_param.source:
            raise self.error("needs infogain_loss_param.source (the H matrix) or a third "
                             "bottom holding H")
        try:
            proto = read_blob_proto(infogain_param.source)
            return blob_proto_array(proto, blob_proto_shape(proto)).astype(self.dtype)
        except (MokaError, ValueError) as e:
            raise self.error(f"cannot read the H matrix: {e}") from None

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        super().reshape(bottom, top)
        self.dims = split_scores(self, bottom, self.axis)
        labels = self.dims[1]
        h_size = self.stored_h.size if self.stored_h is not None else bottom[2].count
        if h_size != labels * labels:
            raise self.error(f"H must be {labels} x {labels} (the size of axis {self.axis} of "
                             f"{bottom[0].shape}); it has {h_size} values")
        if len(top) > 1:
            top[1].reshape(bottom[0].shape)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        outer, classes, inner = self.dims
        h = self._h(bottom)
        self.prob = softmax(bottom[0].data.reshape(self.dims))
        labels, self.valid = read_labels(self, bottom[1], (outer, inner), classes,
                                         self.ignore_label)
        self.h_rows = np.moveaxis(h[labels], -1, 1)  # H[label] laid out as (outer, L, inner)
        log_p = np.log(np.maximum(self.prob, self.prob.dtype.type(self.threshold)))
        per_position = np.einsum("oli,oli->oi", self.h_rows, log_p)
        self.norm = normalizer(self.normalization, outer, inner, int(self.valid.sum()))
        top[0].data[...] = -np.sum(per_position, where=self.valid) / self.norm
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(top[1].shape)

    def backward(self, top: list[Blob], propagate_down: Sequence[bool],
                 bottom: list[Blob]) -> None:
        if any(propagate_down[1:]):
            raise self.error("cannot backpropagate to the labels or to H (bottoms 1 and 2)")
        if not propagate_down[0]:
            return
        row_sums = self.h_rows.sum(axis=1, keepdims=True)  # sum_k H[label, k]
        grad = self.prob * row_sums - self.h_rows
        grad *= self.valid[:, None, :]
        bottom[0].diff[...] = (grad * top_scale(top, self.norm)).reshape(bottom[0].shape)

    def _h(self, bottom: list[Blob]) -> np.ndarray:
        classes = self.dims[1]
        h = self.stored_h if self.stored_h is not None else bottom[2].data
        return h.reshape(classes, classes)
