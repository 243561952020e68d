"""The DenseImageData layer: image and label-image pairs for segmentation.

Type ``DenseImageData``, messages ``dense_image_data_param`` (SegNet, alexgkendall/caffe-segnet:
source, batch_size, rand_skip, shuffle, new_height, new_width, is_color, root_folder, mirror,
crop_height, crop_width; ENet, TimoSaemann/caffe-enet, adds label_divide_factor) and
``transform_param`` (mean and scale, applied to the image only).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from engine.blob import Blob
from engine.data.image import read_image
from engine.data.listfile import empty_list_error, list_lines
from engine.data.transformer import DataTransformer
from engine.errors import DataError
from engine.layer import register_layer
from engine.layers.image_data import ImageData, resize_linear

log = logging.getLogger(__name__)


def resize_nearest(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST, which the forks use for label images: output cell (y, x) takes
    input cell ``(min(floor(y * H / height), H - 1), min(floor(x * W / width), W - 1))``."""
    _, src_h, src_w = chw.shape
    rows = np.minimum(np.floor(np.arange(height) * (src_h / height)).astype(np.intp), src_h - 1)
    cols = np.minimum(np.floor(np.arange(width) * (src_w / width)).astype(np.intp), src_w - 1)
    return chw[:, rows[:, None], cols]


def read_pair_list(source: str, where: str) -> list[tuple[str, str]]:
    """``image label_image`` lines (two whitespace-separated paths); blank lines skipped."""
    pairs = []
    for number, line in list_lines(source, where, "image list", "image_path label_image_path"):
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{where}: line {number} of '{source}' is {line!r}; expected "
                            f"'image_path label_image_path' (paths without spaces)")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise empty_list_error(source, where, "image list", "image_path label_image_path")
    return pairs


@register_layer
class DenseImageData(ImageData):
    """Segmentation data: an image and its per-pixel label image per line of ``source``.

    Both read from ``root_folder + path`` for each ``image label`` line.

    Tops: data (batch_size, C, H, W) as ImageData (C = 3 BGR when ``is_color``, else 1; OpenCV
    INTER_LINEAR resize to ``new_height`` x ``new_width``), through transform_param's mean and
    scale; label (batch_size, 1, H / f, W / f), f = ``label_divide_factor``: the label image
    read as gray, resized with INTER_NEAREST to ``new_height / f`` x ``new_width / f``, pixel
    values kept. ``mirror`` flips image and label together (a coin per item) and
    ``crop_height`` x ``crop_width`` crops both at one random offset (in every phase, as the
    forks); random draws per item, from ``rng``: the coin, then the row and column offsets.
    transform_param's own ``mirror`` and ``crop_size`` are refused: the forks apply them to
    image and label independently, which misaligns them. Shuffling, ``rand_skip``, the
    per-batch shape and the resumable state ``{"cursor", "epoch", "order"}`` are ImageData's.
    """

    n_top = (2, 2)
    shareable = False  # its own forward reads every line: no split between MPI ranks
    items = "pairs"

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.dense_image_data_param
        self.batch_size = self._batch_size(p.batch_size)
        self.new_height, self.new_width = int(p.new_height), int(p.new_width)
        self.crop = (int(p.crop_height), int(p.crop_width))
        self.divide = int(p.label_divide_factor)
        self._check_sizes()
        self.color, self.root, self.source = bool(p.is_color), p.root_folder, p.source
        self.shuffle, self.mirror = bool(p.shuffle), bool(p.mirror)
        transform = self.param.transform_param
        if transform.mirror or transform.crop_size:
            raise self.error("transform_param mirror/crop_size would move the image and its "
                             "label apart; use dense_image_data_param's mirror, crop_height "
                             "and crop_width, which apply to both")
        if p.mean_file:
            log.warning("%s: dense_image_data_param.mean_file is unused (as in the forks); "
                        "give transform_param.mean_file", self.where)
        self.transformer = DataTransformer(transform, self.phase,
                                           f"{self.where}, source '{p.source}'")
        self.lines = read_pair_list(p.source, self.where)
        self._start(int(p.rand_skip))
        self._set_top_shapes(*self._load(self.cursor))

    def _check_sizes(self) -> None:
        if (self.new_height > 0) != (self.new_width > 0):
            raise self.error(f"set new_height and new_width together (or neither); got "
                             f"new_height {self.new_height}, new_width {self.new_width}")
        if (self.crop[0] > 0) != (self.crop[1] > 0):
            raise self.error(f"set crop_height and crop_width together (or neither); got "
                             f"{self.crop[0]} and {self.crop[1]}")
        if self.divide < 1:
            raise self.error(f"label_divide_factor must be >= 1; got {self.divide}")
        if self.divide > 1 and (self.crop[0] or not self.new_height):
            raise self.error("label_divide_factor needs new_height/new_width (the label is "
                             "resized to them divided by the factor) and no crop")

    def _read(self, path: str, line: int, color: bool) -> np.ndarray:
        full = self.root + path
        if not os.path.isfile(full):
            raise DataError(f"{self.where}: could not load '{full}' (line {line} of "
                            f"'{self.source}'): no such file")
        return read_image(full, color)

    def _load(self, cursor: int) -> tuple[np.ndarray, np.ndarray]:
        """The image (resized) and its label image (resized, gray) for line ``order[cursor]``."""
        index = int(self.order[cursor])
        image_path, label_path = self.lines[index]
        image = self._read(image_path, index + 1, self.color)
        label = self._read(label_path, index + 1, False)
        if self.new_height:
            image = resize_linear(image, self.new_height, self.new_width)
            label = resize_nearest(label, self.new_height // self.divide,
                                   self.new_width // self.divide)
        want = (image.shape[1] // self.divide, image.shape[2] // self.divide)
        if label.shape[1:] != want:
            raise DataError(f"{self.where}: label image '{self.root + label_path}' is "
                            f"{label.shape[1]}x{label.shape[2]} but its image needs "
                            f"{want[0]}x{want[1]} (line {index + 1} of '{self.source}')")
        return image, label

    def _set_top_shapes(self, image: np.ndarray, label: np.ndarray) -> None:
        if self.crop[0]:
            if image.shape[1] < self.crop[0] or image.shape[2] < self.crop[1]:
                raise self.error(f"crop {self.crop[0]}x{self.crop[1]} is larger than the "
                                 f"{image.shape[1]}x{image.shape[2]} image")
            image = image[:, :self.crop[0], :self.crop[1]]
            label = label[:, :self.crop[0], :self.crop[1]]
        self.top_shape = (self.batch_size, *self.transformer.infer_shape(image.shape))
        self.label_shape = (self.batch_size, 1, *label.shape[1:])

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape(self.top_shape)
        top[1].reshape(self.label_shape)

    def _augment(self, image: np.ndarray,
                 label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shared mirror and crop, with the forks' order of draws."""
        if self.mirror and self.rng.integers(0, 2):
            image, label = image[..., ::-1], label[..., ::-1]
        if self.crop[0]:
            h_off = int(self.rng.integers(0, image.shape[1] - self.crop[0] + 1))
            w_off = int(self.rng.integers(0, image.shape[2] - self.crop[1] + 1))
            rows, cols = slice(h_off, h_off + self.crop[0]), slice(w_off, w_off + self.crop[1])
            image, label = image[:, rows, cols], label[:, rows, cols]
        return image, label

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        images, labels = [], []
        for _ in range(self.batch_size):
            image, label = self._augment(*self._load(self.cursor))
            images.append(image)
            labels.append(label)
            self._advance()
        self._set_top_shapes(images[0], labels[0])
        self.reshape(bottom, top)
        if any(label.shape[1:] != self.label_shape[2:] for label in labels):
            raise DataError(f"{self.where}: the images of a batch must all have the size of "
                            f"the first unless new_height/new_width or a crop is set")
        self.transformer.transform(images, top[0].data, self.rng)
        top[1].data[...] = np.stack(labels)
