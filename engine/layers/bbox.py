"""Box arithmetic for SSD detection, after the SSD fork's ``bbox_util`` (weiliu89/caffe, ssd):
decoding location predictions against prior boxes, Jaccard overlap, greedy NMS.

Boxes are arrays ``[..., 4]`` of ``xmin, ymin, xmax, ymax`` in normalised coordinates.
"""

from __future__ import annotations

import numpy as np

from engine import caffe_pb2

CodeType = caffe_pb2.PriorBoxParameter.CodeType


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances: np.ndarray, code_type: int,
                 variance_encoded_in_target: bool) -> np.ndarray:
    """Boxes from predictions ``loc`` (..., P, 4) and ``priors``/``variances`` (P, 4).

    CORNER adds (variance-scaled) offsets to the corners; CENTER_SIZE moves the centre by
    offsets times the prior's size and scales the size by ``exp``; CORNER_SIZE adds offsets
    times the prior's size to the corners. ``variance_encoded_in_target``: offsets are used as
    they are (the variances were applied when the targets were encoded).
    """
    delta = loc if variance_encoded_in_target else loc * variances
    if code_type == CodeType.CORNER:
        return priors + delta
    size = np.concatenate([priors[:, 2:] - priors[:, :2]] * 2, axis=-1)
    if code_type == CodeType.CORNER_SIZE:
        return priors + delta * size
    if code_type != CodeType.CENTER_SIZE:
        raise ValueError(f"unknown code_type {code_type}")
    centre = (priors[:, :2] + priors[:, 2:]) / 2
    new_centre = delta[..., :2] * size[:, :2] + centre
    half = np.exp(delta[..., 2:]) * size[:, :2] / 2
    return np.concatenate([new_centre - half, new_centre + half], axis=-1)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Width times height; 0 for an inverted box (xmax < xmin or ymax < ymin)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return np.where((w < 0) | (h < 0), 0, w * h)


def jaccard(boxes: np.ndarray) -> np.ndarray:
    """(K, K) intersection over union of every pair of ``boxes`` (K, 4), 0 for pairs that do
    not overlap (the fork's ``JaccardOverlap``, all pairs at once)."""
    wh = (np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
          - np.maximum(boxes[:, None, :2], boxes[None, :, :2]))
    overlap = (wh[..., 0] > 0) & (wh[..., 1] > 0)
    inter = np.where(overlap, wh[..., 0] * wh[..., 1], 0)
    area = box_area(boxes)
    union = area[:, None] + area[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1), 0)


def nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, nms_threshold: float,
        eta: float, top_k: int) -> np.ndarray:
    """Indices kept by the fork's ``ApplyNMSFast``, best score first.

    Candidates score strictly above ``score_threshold``, in stable descending score order,
    at most ``top_k`` of them (``-1``: all). A candidate is kept when its overlap with every
    box kept so far is at most the threshold; after each keep, while the threshold is above
    0.5, it is multiplied by ``eta`` (adaptive NMS; ``eta = 1`` leaves it fixed).
    """
    candidates = np.flatnonzero(scores > score_threshold)
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        candidates = candidates[:top_k]
    iou = jaccard(boxes[candidates])
    keep = np.zeros(len(candidates), dtype=bool)
    threshold = nms_threshold
    if eta >= 1 or threshold <= 0.5:  # a fixed threshold: each kept box removes its overlaps
        suppressed = np.zeros(len(candidates), dtype=bool)
        for i in range(len(candidates)):  # greedy, in score order
            if not suppressed[i]:
                keep[i] = True
                suppressed |= iou[i] > threshold
        return candidates[keep]
    for i in range(len(candidates)):  # adaptive: the threshold changes as boxes are kept
        if not np.any(iou[i, keep] > threshold):
            keep[i] = True
            if threshold > 0.5:
                threshold *= eta
    return candidates[keep]
