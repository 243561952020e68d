"""pycaffe's ``caffe.Classifier``: a TEST-phase Net that classifies H x W x K images.

Images are resized to ``image_dims``, cropped to the net's input size (the centre crop, or
pycaffe's ten crops: 4 corners + centre and their mirrors, whose predictions are averaged),
preprocessed by a :class:`engine.io.Transformer` and run through ``forward_all``.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np

from engine.caffe_io import Transformer, oversample, resize_image
from engine.layer import TEST
from engine.net import Net


def configure_transformer(net: Net, mean: np.ndarray | None, input_scale: float | None,
                          raw_scale: float | None,
                          channel_swap: Sequence[int] | None) -> Transformer:
    """The Transformer pycaffe's Classifier and Detector build for the net's first input."""
    in_ = net.inputs[0]
    transformer = Transformer({in_: net.blobs[in_].data.shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


class Classifier(Net):
    """``Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None)``.

    ``image_dims`` (height, width) is the size images are scaled to before cropping; by default
    the net's input size (so the crop is the whole image).
    """

    def __init__(self, model_file: str | PathLike, pretrained_file: str | PathLike | None,
                 image_dims: Sequence[int] | None = None, mean: np.ndarray | None = None,
                 input_scale: float | None = None, raw_scale: float | None = None,
                 channel_swap: Sequence[int] | None = None) -> None:
        super().__init__(model_file, TEST, weights=pretrained_file)
        in_ = self.inputs[0]
        self.transformer = configure_transformer(self, mean, input_scale, raw_scale,
                                                 channel_swap)
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """(N, C) class probabilities for N images H x W x K (any sizes).

        ``oversample``: average over the ten crops (default); else the centre crop only.
        """
        h, w = (int(d) for d in self.image_dims[:2])
        images = np.zeros((len(inputs), h, w, inputs[0].shape[2]), dtype=np.float32)
        for ix, image in enumerate(inputs):
            images[ix] = resize_image(image, (h, w))
        if oversample:
            crops = _oversample(images, self.crop_dims)
        else:
            center = np.array((h, w)) / 2.0
            box = (np.tile(center, 2) + np.concatenate([-self.crop_dims / 2.0,
                                                        self.crop_dims / 2.0])).astype(int)
            crops = images[:, box[0]:box[2], box[1]:box[3], :]
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions


_oversample = oversample  # predict's ``oversample`` flag shadows the function's name
