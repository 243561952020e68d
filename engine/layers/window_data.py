"""The WindowData layer of R-CNN fine-tuning: type ``WindowData``, messages ``window_data_param``
(source, batch_size, fg_threshold, bg_threshold, fg_fraction, context_pad, crop_mode, scale,
cache_images, root_folder) and ``transform_param`` (crop_size, mirror, mean_file, mean_value).

The window file, as Caffe reads it (whitespace-separated), repeats for every image::

    # image_index
    image_path
    channels height width
    num_windows
    class_index overlap x1 y1 x2 y2      (num_windows lines; pixel corners, inclusive)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from engine.blob import Blob
from engine.data.db import read_mean
from engine.data.image import read_image
from engine.data.listfile import empty_list_error, list_lines
from engine.errors import DataError
from engine.layer import register_layer
from engine.layers.data import DataLayer
from engine.layers.image_data import resize_linear

log = logging.getLogger(__name__)


@dataclass
class WindowFile:
    """Images (path, (C, H, W)) and windows (image, label, overlap, x1, y1, x2, y2) per kind."""

    images: list[tuple[str, tuple[int, int, int]]]
    foreground: list[tuple[int, int, float, int, int, int, int]]
    background: list[tuple[int, int, float, int, int, int, int]]


class _Tokens:
    """The whitespace-separated tokens of a window file, taken in order, with line numbers."""

    def __init__(self, source: str, where: str) -> None:
        self.source, self.where = source, where
        self.tokens = [(token, number)
                       for number, line in list_lines(source, where, "window file")
                       for token in line.split()]
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.tokens)

    def take(self, kind: type, what: str):
        if not self.more():
            raise DataError(f"{self.where}: '{self.source}' ends early; expected {what}")
        token, _ = self.tokens[self.pos]
        self.pos += 1
        try:
            return kind(token)
        except ValueError:
            raise self.error(f"expected {what}, got {token!r}") from None

    def error(self, message: str) -> DataError:
        """An error at the line of the last token taken."""
        line = self.tokens[self.pos - 1][1]
        return DataError(f"{self.where}: '{self.source}' line {line}: {message}")


def read_window_file(source: str, root: str, fg_threshold: float, bg_threshold: float,
                     where: str) -> WindowFile:
    """Parse ``source`` and sort its windows as Caffe does: overlap >= fg_threshold is
    foreground (label must be > 0), overlap < bg_threshold background (label and overlap set
    to 0), anything between is dropped."""
    tokens = _Tokens(source, where)
    out = WindowFile([], [], [])
    fg, bg = np.float32(fg_threshold), np.float32(bg_threshold)
    while tokens.more():
        if tokens.take(str, "'#'") != "#":
            raise tokens.error("expected '#' starting an image record")
        index = tokens.take(int, "the image index")
        path = root + tokens.take(str, "the image path")
        size = (tokens.take(int, "channels"), tokens.take(int, "height"),
                tokens.take(int, "width"))
        out.images.append((path, size))
        for _ in range(tokens.take(int, "the number of windows")):
            label = tokens.take(int, "a class index")
            overlap = np.float32(tokens.take(float, "an overlap"))
            box = tuple(tokens.take(int, "a window corner") for _ in range(4))
            if overlap >= fg:
                if label <= 0:
                    raise tokens.error(f"a foreground window (overlap {overlap}) needs a class "
                                       f"index > 0; got {label}")
                out.foreground.append((index, label, float(overlap), *box))
            elif overlap < bg:
                out.background.append((index, 0, 0.0, *box))
    return out


def _round(value: float) -> int:
    """C's round(): halves away from zero."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


@register_layer
class WindowData(DataLayer):
    """Warped image windows for R-CNN: data (batch_size, 3, crop, crop) and label (batch_size,).

    Each batch: first batch_size - int(batch_size * fg_fraction) background windows (label 0),
    then the foreground ones, each drawn at random from its list; with ``mirror`` a coin per
    window decides a horizontal flip. A window is widened so that, warped to crop x crop, it has
    ``context_pad`` pixels of context on each side (``crop_mode: "square"`` first makes it
    square); the part outside the image stays 0. The image region is resized with OpenCV's
    INTER_LINEAR, then ``(pixel - mean) * window_data_param.scale`` (transform_param.scale is
    not used, as in Caffe). Random draws (from the net's generator): per window, a 32-bit
    integer whose remainder picks it, then the mirror coin.
    """

    n_top = (2, 2)

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        p = self.param.window_data_param
        t = self._transform_param(p)
        self.batch_size = self._batch_size(p.batch_size)
        self.crop = int(t.crop_size)
        if self.crop <= 0:
            raise self.error("transform_param.crop_size must be positive: windows are warped "
                             "to crop_size x crop_size")
        if p.crop_mode not in ("warp", "square"):
            raise self.error(f"window_data_param.crop_mode must be \"warp\" or \"square\"; got "
                             f"{p.crop_mode!r}")
        self.square = p.crop_mode == "square"
        self.context_pad = int(p.context_pad)
        if 2 * self.context_pad >= self.crop:
            raise self.error(f"context_pad {self.context_pad} leaves no room in crop_size "
                             f"{self.crop}; it must be less than half of it")
        self.mirror = bool(t.mirror)
        self.scale = self.dtype.type(p.scale)
        self.fg_fraction = float(p.fg_fraction)
        self.windows = read_window_file(p.source, p.root_folder, p.fg_threshold,
                                        p.bg_threshold, self.where)
        self._check_windows(p.source)
        self.channels = self.windows.images[-1][1][0]
        self.mean = self._mean(t)
        self.cache = ({i: self._read(i) for i in range(len(self.windows.images))}
                      if p.cache_images else None)
        log.info("%s: %d images, %d foreground and %d background windows", self.where,
                 len(self.windows.images), len(self.windows.foreground),
                 len(self.windows.background))

    def _transform_param(self, p):
        """transform_param, completed by the legacy window_data_param fields (as an old net
        upgraded by Caffe would have them)."""
        merged = type(self.param.transform_param)()
        merged.CopyFrom(self.param.transform_param)
        for field in ("mean_file", "crop_size", "mirror"):
            if p.HasField(field) and not merged.HasField(field):
                setattr(merged, field, getattr(p, field))
        if merged.HasField("scale"):
            log.warning("%s: transform_param.scale is ignored; WindowData scales by "
                        "window_data_param.scale, as Caffe's does", self.where)
        return merged

    def _check_windows(self, source: str) -> None:
        w = self.windows
        if not w.images:
            raise empty_list_error(source, self.where, "window file")
        if not w.foreground or not w.background:
            kind = "foreground" if not w.foreground else "background"
            raise DataError(f"{self.where}: '{source}' has no {kind} windows at these "
                            f"thresholds; each batch needs both kinds")
        for window in w.foreground + w.background:
            if not 0 <= window[0] < len(w.images):
                raise DataError(f"{self.where}: '{source}' has a window of image index "
                                f"{window[0]}, but only {len(w.images)} images (indices "
                                f"count from 0 in file order)")
        if any(size[0] != 3 for _, size in w.images):
            raise DataError(f"{self.where}: '{source}' lists an image with other than 3 "
                            f"channels; WindowData reads every image in colour (BGR), as Caffe")

    def _mean(self, t) -> np.ndarray | None:
        if t.mean_file and len(t.mean_value):
            raise self.error("give mean_file or mean_value, not both")
        if t.mean_file:
            mean = read_mean(t.mean_file)
            off = (mean.shape[2] - self.crop) // 2  # Caffe centres by the width on both axes
            if mean.shape[0] != self.channels or off < 0 or mean.shape[1] < off + self.crop:
                raise self.error(f"mean file '{t.mean_file}' is {mean.shape}; it needs "
                                 f"{self.channels} channels and, centred by its width, room "
                                 f"for crop_size {self.crop} on both axes")
            return mean[:, off:off + self.crop, off:off + self.crop].astype(self.dtype)
        if len(t.mean_value):
            values = np.asarray(t.mean_value, self.dtype)
            if values.size not in (1, self.channels):
                raise self.error(f"give 1 mean_value or {self.channels}; got {values.size}")
            return np.broadcast_to(values.reshape(-1, 1, 1), (self.channels, self.crop,
                                                              self.crop))
        return None

    def _read(self, index: int) -> np.ndarray:
        path = self.windows.images[index][0]
        return read_image(path, color=True)

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        top[0].reshape((self.batch_size, self.channels, self.crop, self.crop))
        top[1].reshape((self.batch_size,))

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        data = top[0].data
        data[...] = 0
        num_fg = int(np.float32(self.batch_size) * np.float32(self.fg_fraction))
        kinds = [self.windows.background] * (self.batch_size - num_fg)
        kinds += [self.windows.foreground] * num_fg
        for item, windows in enumerate(kinds):
            window = windows[int(self.rng.integers(0, 2**32)) % len(windows)]
            flip = self.mirror and int(self.rng.integers(0, 2**32)) % 2 == 1
            image = self.cache[window[0]] if self.cache is not None else self._read(window[0])
            self._warp(image, window, flip, data[item])
            top[1].data[item] = window[1]

    def _warp(self, image: np.ndarray, window: tuple, flip: bool, out: np.ndarray) -> None:
        """Crop the (context-padded) window, warp it and write it into ``out`` (C, crop, crop)."""
        x1, y1, x2, y2 = window[3:]
        _, rows, cols = image.shape
        height = width = self.crop
        pad_h = pad_w = 0
        if self.context_pad > 0 or self.square:
            (x1, y1, x2, y2), (height, width), (pad_h, pad_w) = self._expand(
                (x1, y1, x2, y2), rows, cols, flip)
        if x1 < 0 or y1 < 0 or x2 >= cols or y2 >= rows or x2 < x1 or y2 < y1:
            raise DataError(f"{self.where}: window ({window[3]}, {window[4]}, {window[5]}, "
                            f"{window[6]}) does not lie inside image "
                            f"'{self.windows.images[window[0]][0]}' ({cols}x{rows})")
        if height <= 0 or width <= 0:
            return  # nothing of the image lands in the crop
        patch = resize_linear(image[:, y1:y2 + 1, x1:x2 + 1], height, width)
        if flip:
            patch = patch[:, :, ::-1]
        region = out[:, pad_h:pad_h + height, pad_w:pad_w + width]
        region[...] = patch
        if self.mean is not None:
            region -= self.mean[:, pad_h:pad_h + height, pad_w:pad_w + width]
        region *= self.scale

    def _expand(self, box: tuple[int, int, int, int], rows: int, cols: int, flip: bool):
        """Caffe's context padding, in the net's float type: the widened box clipped to the
        image, the size its clipped part warps to, and where that part starts in the crop."""
        f = self.dtype.type
        x1, y1, x2, y2 = box
        crop = self.crop
        context_scale = f(crop) / f(crop - 2 * self.context_pad)
        half_h, half_w = f(f(y2 - y1 + 1) / 2.0), f(f(x2 - x1 + 1) / 2.0)
        center_x, center_y = f(x1) + half_w, f(y1) + half_h
        if self.square:
            half_h = half_w = max(half_h, half_w)
        x1 = _round(center_x - half_w * context_scale)
        x2 = _round(center_x + half_w * context_scale)
        y1 = _round(center_y - half_h * context_scale)
        y2 = _round(center_y + half_h * context_scale)
        unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        scale_x, scale_y = f(crop) / f(unclipped_w), f(crop) / f(unclipped_h)
        width = _round(f(x2 - x1 + 1) * scale_x)
        height = _round(f(y2 - y1 + 1) * scale_y)
        pad_h = _round(f(pad_y1) * scale_y)
        pad_w = _round(f(pad_x2 if flip else pad_x1) * scale_x)
        height = min(height, crop - pad_h)
        width = min(width, crop - pad_w)
        return (x1, y1, x2, y2), (height, width), (pad_h, pad_w)
