"""DataTransformer: Caffe's preprocessing of a batch of images (``transform_param``).

The order is Caffe's (src/caffe/data_transformer.cpp): crop, mirror, subtract the mean, scale. Per
element, with the crop offset (h_off, w_off) and the optional horizontal flip::

    top[n, c, h, w'] = (image[n, c, h_off + h, w_off + w] - mean[c, h_off + h, w_off + w]) * scale

where w' = w, or width - 1 - w when item n is mirrored, and ``mean`` is the mean file, a
per-channel ``mean_value`` or 0. The whole batch is transformed at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.data.db import read_mean
from engine.errors import DataError

TRAIN = 0  # caffe.Phase


class DataTransformer:
    """Crop (random offset in TRAIN, centered in TEST), mirror (random in both phases when on),
    mean subtraction and scaling, as Caffe's DataTransformer.

    Random draws per batch, from the generator passed to ``transform``: first the N mirror coins
    (when ``mirror``), then the N row offsets and the N column offsets (TRAIN with a crop).
    """

    def __init__(self, param, phase: int, where: str = "DataTransformer") -> None:
        self.where = where
        self.phase = phase
        self.scale = float(param.scale)
        self.mirror = bool(param.mirror)
        self.crop_size = int(param.crop_size)
        if param.force_color and param.force_gray:
            raise self._error("force_color and force_gray cannot both be set; choose one")
        self.color: bool | None = True if param.force_color else False if param.force_gray else None
        if param.mean_file and len(param.mean_value):
            raise self._error("mean_file and mean_value cannot both be given; "
                              "keep one of them")
        self.mean_file = param.mean_file
        self.mean = read_mean(param.mean_file) if param.mean_file else None
        self.mean_values = np.asarray(param.mean_value, np.float64) if len(param.mean_value) \
            else None

    @property
    def active(self) -> bool:
        """False when the transform is the identity (apart from the cast to float)."""
        return bool(self.crop_size or self.mirror or self.mean is not None
                    or self.mean_values is not None or self.scale != 1.0)

    @property
    def random(self) -> bool:
        """Whether ``transform`` draws random numbers (mirror coins, TRAIN crop offsets)."""
        return self.mirror or bool(self.crop_size and self.phase == TRAIN)

    def infer_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) an image of ``image_shape`` becomes; checks crop and mean fit it."""
        channels, height, width = (int(d) for d in image_shape)
        if self.crop_size and (height < self.crop_size or width < self.crop_size):
            raise self._error(f"crop_size {self.crop_size} is larger than the {height}x{width} "
                              f"image; use a crop_size of at most {min(height, width)}")
        if self.mean is not None and self.mean.shape != (channels, height, width):
            raise self._error(f"mean file '{self.mean_file}' is {_dims(self.mean.shape)} but the "
                              f"images are {_dims((channels, height, width))}; the mean must be "
                              f"computed from images of the same size")
        if self.mean_values is not None and self.mean_values.size not in (1, channels):
            raise self._error(f"mean_value has {self.mean_values.size} values but the images "
                              f"have {channels} channels; give 1 value or one per channel")
        if self.crop_size:
            return channels, self.crop_size, self.crop_size
        return channels, height, width

    def transform(self, images: np.ndarray | Sequence[np.ndarray], out: np.ndarray,
                  rng: np.random.Generator | None) -> None:
        """Transform N CHW images (a 4-d array, or a list when sizes vary) into ``out``.
        ``rng`` may be None when the transform is not ``random``.

        Images of different sizes are allowed only with a crop, as in Caffe.
        """
        if not isinstance(images, np.ndarray):
            shapes = {image.shape for image in images}
            if len(shapes) == 1:
                images = np.stack(images)
        n = len(images)
        shapes = [images.shape[1:]] * n if isinstance(images, np.ndarray) \
            else [image.shape for image in images]
        for shape in dict.fromkeys(shapes):
            if self.infer_shape(shape) != out.shape[1:]:
                raise self._error(f"an image of {_dims(shape)} does not fit the batch of "
                                  f"{_dims(out.shape[1:])}; images must all have the size of "
                                  f"the first unless crop_size is set")
        flip = rng.integers(0, 2, n).astype(bool) if self.mirror else None
        h_off, w_off = self._offsets(np.array([s[1] for s in shapes]),
                                     np.array([s[2] for s in shapes]), rng)
        out[...] = self._crop(images, h_off, w_off)
        if self.mean is not None:
            out -= self._crop(self.mean[None], h_off, w_off).astype(out.dtype)
        elif self.mean_values is not None:
            out -= self.mean_values.astype(out.dtype)[:, None, None]
        if flip is not None and flip.any():
            out[flip] = out[flip][..., ::-1]
        if self.scale != 1.0:
            out *= out.dtype.type(self.scale)

    def _offsets(self, heights: np.ndarray, widths: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if not self.crop_size:
            return np.zeros_like(heights), np.zeros_like(widths)
        if self.phase == TRAIN:
            return (rng.integers(0, heights - self.crop_size + 1),
                    rng.integers(0, widths - self.crop_size + 1))
        return (heights - self.crop_size) // 2, (widths - self.crop_size) // 2

    def _crop(self, images: np.ndarray | Sequence[np.ndarray], h_off: np.ndarray,
              w_off: np.ndarray) -> np.ndarray:
        """The crop windows at the offsets (broadcast when ``images`` holds one image)."""
        size = self.crop_size
        if not size:
            return np.asarray(images)
        if not isinstance(images, np.ndarray):
            return np.stack([image[:, h:h + size, w:w + size]
                             for image, h, w in zip(images, h_off, w_off, strict=True)])
        windows = sliding_window_view(images, (size, size), axis=(2, 3))
        if len(images) == 1:
            return windows[0][:, h_off, w_off].transpose(1, 0, 2, 3)
        return windows[np.arange(len(images)), :, h_off, w_off]

    def _error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)
