"""pycaffe's ``caffe.Detector``: R-CNN style windowed detection with a TEST-phase Net.

Each window (ymin, xmin, ymax, xmax) is cropped from its image, optionally with ``context_pad``
pixels of surrounding context (filled with the mean where the window runs off the image), warped
to the net's input size and classified; ``detect_windows`` returns pycaffe's list of dicts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from os import PathLike

import numpy as np

from engine.caffe_io import load_image, resize_image
from engine.classifier import configure_transformer
from engine.errors import MokaError
from engine.layer import TEST
from engine.net import Net


class Detector(Net):
    """``Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)``."""

    def __init__(self, model_file: str | PathLike, pretrained_file: str | PathLike | None,
                 mean: np.ndarray | None = None, input_scale: float | None = None,
                 raw_scale: float | None = None, channel_swap: Sequence[int] | None = None,
                 context_pad: int | None = None) -> None:
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = configure_transformer(self, mean, input_scale, raw_scale,
                                                 channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows: Iterable[tuple[str, Sequence]]) -> list[dict]:
        """``[{'window', 'prediction', 'filename'}, ...]`` for (image file, windows) pairs."""
        images_windows = [(name, list(windows)) for name, windows in images_windows]
        crops = []
        for filename, windows in images_windows:
            image = load_image(filename).astype(np.float32)
            for window in windows:
                try:
                    crops.append(self.crop(image, np.asarray(window)))
                except MokaError as exc:
                    raise MokaError(f"{filename}: {exc}") from None
        if not crops:
            return []
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        detections = []
        for filename, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[len(detections)],
                                   "filename": filename})
        return detections

    def detect_selective_search(self, image_fnames: Sequence[str]) -> list[dict]:
        """Detect over Selective Search proposals (needs selective_search_ijcv_with_python)."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError:
            raise MokaError("detect_selective_search needs the selective_search_ijcv_with_python "
                            "package (and MATLAB), which is not installed; compute windows "
                            "elsewhere and call detect_windows([(image, windows), ...])") from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows, strict=True))

    def crop(self, im: np.ndarray, window: np.ndarray) -> np.ndarray:
        """The window (ymin, xmin, ymax, xmax) of an H x W x K image, with context if set.

        With ``context_pad`` the box is enlarged so that, once warped to the input size, a
        border of ``context_pad`` pixels is context; parts outside the image are the mean.
        """
        window = np.asarray(window)
        if not self.context_pad:
            return im[int(window[0]):int(window[2]), int(window[1]):int(window[3])]
        crop_size = self.blobs[self.inputs[0]].width  # assumes a square input, as pycaffe
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (window[2] - window[0] + 1) / 2.0
        half_w = (window[3] - window[1] + 1) / 2.0
        center = (window[0] + half_h, window[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = round(max(0, -box[0]) * scale_h)  # how far the box runs off the image
        pad_x = round(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        y0, x0, y1, x1 = (int(v) for v in box)
        if y1 <= y0 or x1 <= x0:  # no pixel of the image inside the enlarged box
            raise MokaError(f"window {tuple(window.tolist())} lies outside the {im_h}x{im_w} image")
        crop_h = min(round(clip_h * scale_h), crop_size - pad_y)
        crop_w = min(round(clip_w * scale_w), crop_size - pad_x)
        context = resize_image(im[y0:y1, x0:x1], (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return crop

    def configure_crop(self, context_pad: int | None) -> None:
        """Set ``crop_dims`` (H, W, K) and ``context_pad``; with context, the mean to pad with
        in unprocessed image space (channel swap and raw scale undone)."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_]
        inv_tpose = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if not self.context_pad:
            return
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = mean.copy().transpose(inv_tpose)
        channel_order = self.transformer.channel_swap.get(in_)
        if channel_order is not None:
            inverse = [list(channel_order).index(i) for i in range(crop_mean.shape[2])]
            crop_mean = crop_mean[:, :, inverse]
        raw_scale = self.transformer.raw_scale.get(in_)
        if raw_scale is not None:
            crop_mean = crop_mean / raw_scale
        self.crop_mean = crop_mean
