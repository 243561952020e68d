"""The ImageData layer: image files named in a list file, with their labels.

Type ``ImageData``, messages ``image_data_param`` (source, root_folder, batch_size, new_height,
new_width, is_color, shuffle, rand_skip) and ``transform_param``. ``resize_linear`` is OpenCV's
``cv::resize`` INTER_LINEAR, which Caffe's ReadImageToCVMat uses (also used by
``engine convert-imageset``).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from engine.blob import Blob
from engine.data.image import read_image
from engine.data.listfile import empty_list_error, list_lines
from engine.data.prefetch import Prefetcher
from engine.data.transformer import DataTransformer
from engine.errors import DataError
from engine.layer import register_layer
from engine.layers.data import DataLayer

log = logging.getLogger(__name__)

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_ONE = 1 << _COEF_BITS


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the fixed-point weight of i0 for each output position.

    OpenCV's geometry: pixel centres aligned ((d + 0.5) * scale - 0.5, in float32), indices
    clamped to the image, weights rounded to 1/2048.
    """
    scale = src / dst
    pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    base = np.floor(pos)
    frac = pos - base
    base = base.astype(np.int64)
    w0 = np.rint((np.float32(1) - frac) * _COEF_ONE).astype(np.int64)
    i0 = np.clip(base, 0, src - 1)
    i1 = np.clip(base + 1, 0, src - 1)
    return i0, i1, w0


def resize_linear(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a CHW uint8 image to (height, width) as OpenCV's INTER_LINEAR does.

    Rows are interpolated first into 2048-scaled integers, then columns, and the 2^22-scaled
    sum is rounded back to uint8 (OpenCV's generic path; its SIMD path may round a few pixels
    one level differently). Unlike Pillow's bilinear filter there is no antialiasing when
    shrinking: each output pixel reads only its 2x2 neighbours.
    """
    _, src_h, src_w = chw.shape
    if (src_h, src_w) == (height, width):
        return chw
    x0, x1, a0 = _linear_taps(src_w, width)
    y0, y1, b0 = _linear_taps(src_h, height)
    wide = chw.astype(np.int64)
    rows = wide[:, :, x0] * a0 + wide[:, :, x1] * (_COEF_ONE - a0)
    b0 = b0[:, None]
    out = rows[:, y0] * b0 + rows[:, y1] * (_COEF_ONE - b0)
    return ((out + (1 << (2 * _COEF_BITS - 1))) >> (2 * _COEF_BITS)).astype(np.uint8)


def read_list_file(source: str, where: str) -> list[tuple[str, int]]:
    """``relpath label`` lines, split at the last space (paths may hold spaces); blanks skipped."""
    lines = []
    for number, line in list_lines(source, where, "image list", "relative/path label"):
        line = line.rstrip()
        path, _, label = line.rpartition(" ")
        try:
            lines.append((path, int(label)))
        except ValueError:
            raise DataError(f"{where}: line {number} of '{source}' is {line!r}; expected "
                            f"'relative/path label' with an integer label") from None
        if not path:
            raise DataError(f"{where}: line {number} of '{source}' is {line!r}; expected "
                            f"'relative/path label' with an integer label")
    if not lines:
        raise empty_list_error(source, where, "image list", "relative/path label")
    return lines


@register_layer
class ImageData(DataLayer):
    """Images read from ``root_folder + path`` for each ``path label`` line of ``source``.

    Tops: data (batch_size, C, H, W), C = 3 (BGR) when ``is_color`` else 1 (gray), H x W the
    image's size, ``new_height`` x ``new_width`` when both are set (OpenCV INTER_LINEAR resize),
    or crop x crop with transform_param's crop_size; label (batch_size,). As in Caffe each
    batch takes its shape from its first image, ``shuffle`` reorders the list at setup and
    again at every wrap (from ``rng``), and ``rand_skip`` starts at a random line in
    [0, rand_skip). State: ``{"cursor", "epoch", "order"}`` (the next line, wraps done, and the
    current order of the list).

    The images of the next batch up to the end of the list are read and resized on a background
    thread while the net computes (engine/data/prefetch.py); the reshuffle at a wrap and the
    transform's draws stay in the forward, so the state is unchanged by prefetching.
    """

    n_top = (1, 2)
    shareable = True
    prefetch: Prefetcher | None = None  # set in setup (subclasses with their own reads: None)
    items = "images"  # what the list's lines name, in messages

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.image_data_param
        self.batch_size = self._batch_size(p.batch_size)
        self.new_height, self.new_width = int(p.new_height), int(p.new_width)
        if (self.new_height > 0) != (self.new_width > 0):
            raise self.error(f"set new_height and new_width together (or neither); got "
                             f"new_height {self.new_height}, new_width {self.new_width}")
        self.color = bool(p.is_color)
        self.root = p.root_folder
        self.source = p.source
        self.shuffle = bool(p.shuffle)
        self.transformer = DataTransformer(self.param.transform_param, self.phase,
                                           f"{self.where}, source '{p.source}'")
        self.lines = read_list_file(p.source, self.where)
        self._start(int(p.rand_skip))
        first = self._load(self.cursor)
        self.top_shape = (self.batch_size, *self.transformer.infer_shape(first.shape))
        self.prefetch = Prefetcher()

    def _start(self, rand_skip: int) -> None:
        """The first order of the list (a permutation from ``rng`` when shuffling), then the
        first line: a draw in [0, rand_skip) when ``rand_skip`` is set. Draws in that order."""
        self.order = np.arange(len(self.lines))
        if self.shuffle:
            log.info("%s: Shuffling data", self.where)
            self.order = self.rng.permutation(len(self.lines))
        log.info("%s: A total of %d %s.", self.where, len(self.lines), self.items)
        self.cursor, self.epoch = 0, 0
        if rand_skip:
            skip = int(self.rng.integers(0, rand_skip))
            if skip >= len(self.lines):
                raise self.error(f"rand_skip drew {skip} but the list has only "
                                 f"{len(self.lines)} {self.items}; use a smaller rand_skip")
            log.info("%s: Skipping first %d data points.", self.where, skip)
            self.cursor = skip

    def _advance(self) -> None:
        """Past one line; past the last, back to the first with a new permutation when
        shuffling (Caffe reshuffles at every wrap)."""
        self.cursor += 1
        if self.cursor >= len(self.lines):
            log.info("%s: Restarting data prefetching from start.", self.where)
            self.cursor = 0
            self.epoch += 1
            if self.shuffle:
                self.order = self.rng.permutation(len(self.lines))

    def _load_ahead(self, cursor: int, order: np.ndarray) -> list[np.ndarray]:
        """The images of lines ``cursor``.. of ``order``, a batch at most, up to the list's end
        (the order after it is drawn at the wrap). Runs in the background."""
        stop = min(cursor + self.batch_size * self.ranks, len(self.lines))
        return [self._load(i, order) for i in range(cursor + self.rank, stop, self.ranks)]

    def _load(self, cursor: int, order: np.ndarray | None = None) -> np.ndarray:
        order = self.order if order is None else order
        path, _ = self.lines[order[cursor]]
        full = self.root + path
        if not os.path.isfile(full):
            raise DataError(f"{self.where}: could not load '{full}' (line "
                            f"{int(order[cursor]) + 1} of '{self.source}'): no such file")
        image = read_image(full, self.color)
        if self.new_height:
            image = resize_linear(image, self.new_height, self.new_width)
        return image

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape(self.top_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        hit, ahead = self.prefetch.take((self.cursor, self.epoch))
        ahead = ahead if hit else []
        images, labels = [], []
        for i in range(self.batch_size * self.ranks):
            if i % self.ranks == self.rank:  # this MPI rank's share (DataLayer.share)
                k = len(images)
                images.append(ahead[k] if k < len(ahead) else self._load(self.cursor))
                labels.append(self.lines[self.order[self.cursor]][1])
            self._advance()
        self.prefetch.start((self.cursor, self.epoch),
                            lambda c=self.cursor, o=self.order: self._load_ahead(c, o))
        self.top_shape = (self.batch_size, *self.transformer.infer_shape(images[0].shape))
        self.reshape(bottom, top)
        self.transformer.transform(images, top[0].data, self.rng)
        if len(top) > 1:
            top[1].data[...] = labels

    def get_state(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch,
                "order": [int(i) for i in self.order]}

    def set_state(self, state: dict) -> None:
        order = np.asarray(state["order"], np.int64)
        if sorted(order.tolist()) != list(range(len(self.lines))):
            raise DataError(f"{self.where}: the saved order holds {len(order)} entries but "
                            f"'{self.source}' lists {len(self.lines)} images; the list changed "
                            f"since the state was saved")
        if self.prefetch is not None:
            self.prefetch.cancel()
        self.order = order
        self.cursor = int(state["cursor"]) % len(self.lines)
        self.epoch = int(state["epoch"])
