"""SSD detection, as the SSD fork (weiliu89/caffe, branch ``ssd``) defines it: ``PriorBox``
(``prior_box_param``) and ``DetectionOutput`` (``detection_output_param``), both forward only.

The fork's training-side types (AnnotatedData, MultiBoxLoss, DetectionEvaluate, ...) parse but
do not run: building a net with one stops with a one-line "not supported" naming the layer.
Boxes are ``[xmin, ymin, xmax, ymax]`` in [0, 1] image coordinates throughout.
"""

from __future__ import annotations

import logging

import numpy as np

from engine.blob import Blob
from engine.layer import UNSUPPORTED, Layer, register_layer
from engine.layers.bbox import decode_boxes, nms

_SSD_TRAINING = ("a training-side layer of the SSD fork (weiliu89/caffe); Moka runs SSD "
                 "nets for inference only: use the deploy prototxt (ending in DetectionOutput)")
UNSUPPORTED.update({kind: _SSD_TRAINING for kind in
                    ("AnnotatedData", "MultiBoxLoss", "DetectionEvaluate", "SmoothL1Loss")})
UNSUPPORTED["VideoData"] = "the SSD fork's webcam/video reader; feed frames through Input"

log = logging.getLogger(__name__)


@register_layer
class PriorBox(Layer):
    """Default boxes for one feature map: for each cell (row-major) and each ``min_size``, the
    square ``min_size`` box, then (with ``max_size``) the square ``sqrt(min*max)`` box, then one
    box per aspect ratio ``r != 1`` of width ``min*sqrt(r)`` and height ``min/sqrt(r)``.

    Aspect ratios are 1 plus ``aspect_ratio`` without repeats, each followed by ``1/r`` when
    ``flip``. Cell centres are ``(w + offset) * step_w`` (``step`` defaults to image size / map
    size); the image size comes from ``img_size``/``img_h``/``img_w`` or bottom 1. ``clip``
    clamps to [0, 1]. Fork quirk kept: sizes are truncated to integers before use.

    Shapes: bottom 0 (N, C, H, W) the feature map, bottom 1 (N, C', H', W') the image ->
    top (1, 2, H*W*num_priors*4): channel 0 the boxes, channel 1 their ``variance``.
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False
    n_bottom = (2, 2)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.prior_box_param
        if not len(p.min_size) or min(p.min_size) <= 0:
            raise self.error("needs at least one min_size, all positive")
        if len(p.max_size) and len(p.max_size) != len(p.min_size):
            raise self.error(f"gives {len(p.max_size)} max_size for {len(p.min_size)} min_size")
        if any(mx <= mn for mn, mx in zip(p.min_size, p.max_size, strict=False)):
            raise self.error("every max_size must be greater than its min_size")
        self.min_sizes = [int(s) for s in p.min_size]
        self.max_sizes = [int(s) for s in p.max_size]
        ratios = [1.0]
        for r in p.aspect_ratio:
            if all(abs(r - known) >= 1e-6 for known in ratios):
                ratios += [r, 1.0 / r] if p.flip else [r]
        self.aspect_ratios = [r for r in ratios if abs(r - 1.0) >= 1e-6]
        self.num_priors = len(self.min_sizes) * len(ratios) + len(self.max_sizes)
        if len(p.variance) not in (0, 1, 4) or min(p.variance, default=1) <= 0:
            raise self.error(f"variance takes 1 or 4 positive values; got {list(p.variance)}")
        self.variance = list(p.variance) or [0.1]
        self.img_hw = self._pair(p, "img_size", "img_h", "img_w")
        self.step_hw = self._pair(p, "step", "step_h", "step_w")
        self.clip, self.offset = p.clip, p.offset

    def _pair(self, p, one: str, h: str, w: str) -> tuple[float, float]:
        """(h, w) from ``one`` or the ``h``/``w`` pair, (0, 0) when neither is given."""
        if p.HasField(h) or p.HasField(w):
            if p.HasField(one):
                raise self.error(f"give either {one} or {h}/{w}, not both")
            if getattr(p, h) <= 0 or getattr(p, w) <= 0:
                raise self.error(f"{h} and {w} must both be positive")
            return getattr(p, h), getattr(p, w)
        if p.HasField(one):
            if getattr(p, one) <= 0:
                raise self.error(f"{one} must be positive")
            return getattr(p, one), getattr(p, one)
        return 0, 0

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape((1, 2, bottom[0].height * bottom[0].width * self.num_priors * 4))

    def box_sizes(self) -> np.ndarray:
        """(num_priors, 2) widths and heights in pixels, in the fork's order."""
        sizes = []
        for i, mn in enumerate(self.min_sizes):
            sizes.append((mn, mn))
            if self.max_sizes:
                side = np.sqrt(mn * self.max_sizes[i])
                sizes.append((side, side))
            sizes += [(mn * np.sqrt(r), mn / np.sqrt(r)) for r in self.aspect_ratios]
        return np.array(sizes, dtype=np.float64)

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        height, width = bottom[0].height, bottom[0].width
        img_h, img_w = self.img_hw if all(self.img_hw) else (bottom[1].height, bottom[1].width)
        step_h, step_w = self.step_hw if all(self.step_hw) else (img_h / height, img_w / width)
        # float32 centres and sizes, as the fork computes them
        offset = np.float32(self.offset)
        cx = (np.arange(width, dtype=np.float32) + offset) * np.float32(step_w)
        cy = (np.arange(height, dtype=np.float32) + offset) * np.float32(step_h)
        half = self.box_sizes().astype(np.float32).astype(np.float64) / 2
        boxes = np.empty((height, width, self.num_priors, 4))
        boxes[..., 0] = (cx[None, :, None] - half[:, 0]) / img_w
        boxes[..., 1] = (cy[:, None, None] - half[:, 1]) / img_h
        boxes[..., 2] = (cx[None, :, None] + half[:, 0]) / img_w
        boxes[..., 3] = (cy[:, None, None] + half[:, 1]) / img_h
        if self.clip:
            np.clip(boxes, 0.0, 1.0, out=boxes)
        out = top[0].data.reshape(2, -1, 4)
        out[0] = boxes.reshape(-1, 4)
        out[1] = self.variance  # one value broadcasts; four repeat per box


@register_layer
class DetectionOutput(Layer):
    """Decoded, per-class NMS-filtered detections, as the SSD fork's CPU forward.

    For each image and each class ``c`` except ``background_label_id``: decode the boxes
    (``code_type``; the class's own boxes unless ``share_location``), keep the NMS survivors
    among the scores above ``confidence_threshold`` (``nms_param``: ``nms_threshold``,
    ``top_k``, ``eta``); then, when more than ``keep_top_k`` (> -1) survive in the image, keep
    the best ``keep_top_k`` over all classes. Rows are written per image, classes ascending,
    scores descending: ``[image, label, score, xmin, ymin, xmax, ymax]`` (unclipped boxes). With
    no detection at all the top holds one row ``[i, -1, ..., -1]`` per image, as the fork's.

    Shapes: loc (N, P*L*4) with L = 1 if ``share_location`` else ``num_classes``, conf
    (N, P*num_classes) (probabilities), priors (1, 2, P*4) -> top (1, 1, D, 7).
    """

    backward_needs_bottom_data = False
    backward_needs_top_data = False
    n_bottom = (3, 3)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.detection_output_param
        if not p.HasField("num_classes") or p.num_classes < 1:
            raise self.error("num_classes must be given (and positive)")
        self.num_classes, self.share_location = p.num_classes, p.share_location
        self.num_loc_classes = 1 if p.share_location else p.num_classes
        self.background = p.background_label_id
        self.code_type, self.keep_top_k = p.code_type, p.keep_top_k
        self.variance_encoded = p.variance_encoded_in_target
        self.confidence_threshold = (p.confidence_threshold if p.HasField("confidence_threshold")
                                     else -np.finfo(np.float32).max)
        nms = p.nms_param
        if nms.nms_threshold < 0 or not 0 < nms.eta <= 1:
            raise self.error("nms_param needs nms_threshold >= 0 and 0 < eta <= 1")
        self.nms_threshold, self.eta = nms.nms_threshold, nms.eta
        self.top_k = nms.top_k if nms.HasField("top_k") else -1
        if p.save_output_param.output_directory or p.visualize:
            log.warning("layer '%s': DetectionOutput's save_output_param and visualize are "
                        "not implemented; the detections are only in the top blob", self.name)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        loc, conf, prior = bottom
        self.num_priors = prior.count // 2 // 4
        if prior.count != self.num_priors * 8 or prior.shape[0] != 1:
            raise self.error(f"bottom 2 (priors) must be PriorBox's (1, 2, P*4); got "
                             f"{prior.shape}")
        expect = {0: self.num_priors * self.num_loc_classes * 4,
                  1: self.num_priors * self.num_classes}
        for i, blob in ((0, loc), (1, conf)):
            if blob.count_axes(1) != expect[i] or blob.shape[0] != loc.shape[0]:
                raise self.error(f"bottom {i} should hold ({loc.shape[0]}, {expect[i]}) values "
                                 f"for {self.num_priors} priors; got shape {blob.shape}")
        top[0].reshape((1, 1, 1, 7))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        loc, conf, prior = (b.data for b in bottom)
        num = loc.shape[0]
        priors, variances = prior.reshape(2, -1, 4).astype(np.float64)
        loc = loc.reshape(num, self.num_priors, self.num_loc_classes, 4).astype(np.float64)
        # decoded in float64, then rounded to the blobs' type for the overlaps (the fork's
        # boxes are float)
        boxes = decode_boxes(loc.transpose(0, 2, 1, 3), priors, variances, self.code_type,
                             self.variance_encoded).astype(conf.dtype)
        scores = conf.reshape(num, self.num_priors, self.num_classes)
        rows = [self._image_rows(i, boxes[i], scores[i]) for i in range(num)]
        rows = [r for r in rows if len(r)]
        if rows:
            out = np.concatenate(rows)
        else:
            out = np.full((num, 7), -1.0)
            out[:, 0] = np.arange(num)
        top[0].reshape((1, 1, len(out), 7))
        top[0].data[0, 0] = out

    def _image_rows(self, image: int, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The (D, 7) rows of one image: boxes (L, P, 4), scores (P, num_classes)."""
        labels, kept = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for c in range(self.num_classes):  # a few classes; NMS within a class is sequential
            if c == self.background:
                continue
            k = nms(boxes[0 if self.share_location else c], scores[:, c],
                    self.confidence_threshold, self.nms_threshold, self.eta, self.top_k)
            labels.append(np.full(len(k), c))
            kept.append(k)
        labels, kept = np.concatenate(labels), np.concatenate(kept)
        score = scores[kept, labels]
        if -1 < self.keep_top_k < len(kept):
            best = np.sort(np.argsort(-score, kind="stable")[:self.keep_top_k])
            labels, kept, score = labels[best], kept[best], score[best]
        rows = np.empty((len(kept), 7))
        rows[:, 0], rows[:, 1], rows[:, 2] = image, labels, score
        rows[:, 3:] = boxes[0 if self.share_location else labels, kept]
        return rows
