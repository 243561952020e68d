"""pycaffe's ``caffe.io``: array/proto conversion, image loading and resizing, the Transformer.

Re-exported by :mod:`engine.io`, so ``import engine as caffe; caffe.io.Transformer`` works as in
pycaffe. The semantics are pycaffe's (python/caffe/io.py); only the dependencies differ:

- images are read with Pillow instead of scikit-image (same result: float32 in [0, 1], H x W x K,
  gray weights 0.2125/0.7154/0.0721 as ``skimage.color.rgb2gray``);
- ``resize_image`` needs neither scikit-image nor SciPy for ``interp_order`` 0 and 1. For 1 or 3
  channels it reproduces ``skimage.transform.resize(mode='constant')`` as current scikit-image
  computes it: pixel-centre coordinates, zero outside the image, and a Gaussian pre-filter with
  sigma ``(factor - 1) / 2`` on downsampled axes. Other channel counts follow
  ``scipy.ndimage.zoom`` (corner-aligned coordinates), as pycaffe does. Higher orders use SciPy
  when it is installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engine import caffe_pb2
from engine.errors import MokaError

# skimage.color.rgb2gray's luminance weights (ITU-R BT.709)
_GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])


class TransformerError(MokaError, ValueError):
    """A Transformer setting that does not fit the net input it is for."""


# -- proto / datum / ndarray conversion ----------------------------------------------------------
def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The BlobProto's data (or diff) as an array of its shape (legacy 4-d fields first).

    A blob with neither ``shape`` nor the legacy fields only reshapes when it holds one value,
    as in pycaffe (otherwise ``ValueError``).
    """
    values = np.array(blob.diff if return_diff else blob.data)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return values.reshape(blob.num, blob.channels, blob.height, blob.width)
    return values.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    """A BlobProto with ``arr``'s shape and values (and ``diff``'s, which must match)."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(float).flat)
    if diff is not None:
        blob.diff.extend(np.asarray(diff).astype(float).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist: Sequence[np.ndarray]) -> bytes:
    """Arrays serialized as one BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(arr) for arr in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(serialized: bytes) -> list[np.ndarray]:
    """The arrays of a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(serialized)
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A Datum from a C x H x W array: uint8 goes to ``data`` as bytes, anything else to
    ``float_data``. The label is set only when given."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"Incorrect array shape: a Datum holds a 3-d (C, H, W) array; got "
                         f"{arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The Datum's values as C x H x W: uint8 from ``data``, else float from ``float_data``.

    The label is not returned (read ``datum.label``). Encoded Datums are not decoded, as in
    pycaffe; ``engine.data.datum`` decodes them.
    """
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    return np.array(datum.float_data, dtype=float).reshape(shape)


# -- image IO ------------------------------------------------------------------------------------
def load_image(filename: str, color: bool = True) -> np.ndarray:
    """An image as float32 in [0, 1]: H x W x 3 (RGB) when ``color``, else H x W x 1 (gray).

    Gray files come out as 3 equal channels when ``color``; alpha is dropped.
    """
    from PIL import Image

    with Image.open(filename) as image:
        image.load()
        img = _as_float(_pil_to_array(image, color))
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img.astype(np.float32)


def _pil_to_array(image, color: bool) -> np.ndarray:
    """Pixels as skimage.io.imread would return them (gray kept 2-d unless converted)."""
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA"
                              else "RGB")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif image.mode == "LA":
        image = image.convert("L")
    elif image.mode == "1":
        return np.asarray(image, dtype=bool)
    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        pixels = pixels.astype(np.uint16)
    if color or pixels.ndim == 2:
        return pixels
    rgb = _as_float(pixels)
    if rgb.shape[2] == 4:  # skimage's rgba2rgb: blend over a white background
        alpha = rgb[:, :, 3:]
        rgb = rgb[:, :, :3] * alpha + (1.0 - alpha)
    return rgb[:, :, :3] @ _GRAY_WEIGHTS


def _as_float(pixels: np.ndarray) -> np.ndarray:
    """skimage's img_as_float: integers scaled by their type's maximum, floats kept."""
    if pixels.dtype == bool:
        return pixels.astype(np.float64)
    if np.issubdtype(pixels.dtype, np.integer):
        return pixels.astype(np.float64) / np.iinfo(pixels.dtype).max
    return pixels.astype(np.float64)


# -- resizing ------------------------------------------------------------------------------------
def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an H x W x K image to ``new_dims`` (height, width); float32 result.

    As pycaffe: 1- and 3-channel images are scaled to [0, 1], resized like scikit-image's
    ``resize(mode='constant')`` and scaled back; a constant image stays constant; other channel
    counts are resized like ``scipy.ndimage.zoom``.
    """
    im = np.asarray(im)
    out_h, out_w = (int(d) for d in new_dims[:2])
    if im.shape[-1] in (1, 3):
        im_min, im_max = float(im.min()), float(im.max())
        if im_max <= im_min:  # a constant image: avoid dividing by zero
            return np.full((out_h, out_w, im.shape[-1]), im_min, dtype=np.float32)
        im_std = (im.astype(np.float32) - im_min) / (im_max - im_min)
        resized = _resize_grid(im_std, (out_h, out_w), interp_order)
        return (resized * (im_max - im_min) + im_min).astype(np.float32)
    return _resize_corners(im, (out_h, out_w), interp_order).astype(np.float32)


def _resize_grid(im: np.ndarray, dims: tuple[int, int], order: int) -> np.ndarray:
    """skimage.transform.resize(im, dims, order, mode='constant') on an image in [0, 1]."""
    if order not in (0, 1):
        return _scipy_resize(im, dims, order, grid=True)
    rows = _grid_matrix(im.shape[0], dims[0], order)
    cols = _grid_matrix(im.shape[1], dims[1], order)
    out = np.einsum("oh,hwk,pw->opk", rows, im.astype(np.float64), cols, optimize=True)
    return np.clip(out, 0.0, 1.0)


def _grid_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """The (n_out, n_in) operator of one axis: anti-alias filter, then sample at pixel centres.

    Output pixel o reads input coordinate ``(o + 0.5) * n_in / n_out - 0.5``; samples beyond the
    image are 0 (scipy's 'grid-constant').
    """
    factor = n_in / n_out
    x = (np.arange(n_out) + 0.5) * factor - 0.5
    if order == 0:
        taps = [(np.floor(x + 0.5).astype(np.int64), np.ones(n_out))]
    else:
        i0 = np.floor(x).astype(np.int64)
        w1 = x - i0
        taps = [(i0, 1.0 - w1), (i0 + 1, w1)]
    sigma = max(0.0, (factor - 1.0) / 2.0)  # skimage's anti-aliasing; 0 when upsampling
    j = np.arange(n_in)
    matrix = np.zeros((n_out, n_in))
    for index, weight in taps:
        inside = (index >= 0) & (index < n_in)
        if sigma > 0:  # row `index` of the Gaussian filter matrix (zero padding)
            contribution = _gaussian(index[:, None] - j[None, :], sigma)
        else:
            contribution = (index[:, None] == j[None, :]).astype(np.float64)
        matrix += (weight * inside)[:, None] * contribution
    return matrix


def _gaussian(offsets: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-d kernel at integer ``offsets`` (truncate = 4)."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights = np.where(np.abs(offsets) <= radius, np.exp(-0.5 * (offsets / sigma) ** 2), 0.0)
    return weights / taps.sum()


def _resize_corners(im: np.ndarray, dims: tuple[int, int], order: int) -> np.ndarray:
    """scipy.ndimage.zoom(im, (dims / shape) + (1,), order): corners map onto corners."""
    if order not in (0, 1):
        return _scipy_resize(im, dims, order, grid=False)
    im = im.astype(np.float64)
    for axis, n_out in enumerate(dims):
        n_in = im.shape[axis]
        x = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        if order == 0:
            im = np.take(im, np.minimum(np.floor(x + 0.5).astype(np.int64), n_in - 1), axis)
            continue
        i0 = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        shape = [1] * im.ndim
        shape[axis] = n_out
        w1 = (x - i0).reshape(shape)
        im = np.take(im, i0, axis) * (1.0 - w1) + np.take(im, i1, axis) * w1
    return im


def _scipy_resize(im: np.ndarray, dims: tuple[int, int], order: int, grid: bool) -> np.ndarray:
    try:
        from scipy import ndimage
    except ImportError:
        raise MokaError(f"resize_image with interp_order={order} needs SciPy (pip install "
                        "scipy); orders 0 and 1 work without it") from None
    zoom = (dims[0] / im.shape[0], dims[1] / im.shape[1], 1.0)
    if grid:
        sigma = [max(0.0, (1.0 / z - 1.0) / 2.0) for z in zoom]  # skimage's anti-aliasing
        smooth = ndimage.gaussian_filter(im.astype(np.float64), sigma, mode="grid-constant")
        out = ndimage.zoom(smooth, zoom, order=order, mode="grid-constant", grid_mode=True)
        return np.clip(out, 0.0, 1.0)
    return ndimage.zoom(im, zoom, order=order)


def oversample(images: Sequence[np.ndarray] | np.ndarray,
               crop_dims: Sequence[int]) -> np.ndarray:
    """The 4 corner crops and the centre crop of each image, then the same 5 mirrored.

    ``images``: N images H x W x K (one size); returns (10 N, crop_h, crop_w, K) float32, in
    pycaffe's order: per image, corners (top-left, top-right, bottom-left, bottom-right), centre,
    then their left-right mirrors.
    """
    stack = np.asarray(images)
    n, h, w = stack.shape[:3]
    ch, cw = (int(d) for d in crop_dims[:2])
    # pycaffe's centre crop starts at centre - crop/2 (both floats), truncated to an integer
    starts = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw),
              (int(h / 2.0 - ch / 2.0), int(w / 2.0 - cw / 2.0))]
    crops = np.stack([stack[:, y:y + ch, x:x + cw] for y, x in starts], axis=1)
    crops = np.concatenate([crops, crops[:, :, :, ::-1]], axis=1)
    return crops.reshape(10 * n, ch, cw, *stack.shape[3:]).astype(np.float32)


# -- the Transformer -----------------------------------------------------------------------------
class Transformer:
    """Prepares H x W x K images (floats in [0, 1]) for a net input, and undoes it.

    ``Transformer({'data': net.blobs['data'].data.shape})``. ``preprocess`` applies, per input:
    float32 → resize to the input's H x W → transpose → channel swap → ``* raw_scale`` →
    ``- mean`` → ``* input_scale``; ``deprocess`` applies the inverse in reverse order.
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]]) -> None:
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose: dict[str, tuple[int, ...]] = {}
        self.channel_swap: dict[str, tuple[int, ...]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise TransformerError(f"{in_} is not one of the net inputs: {list(self.inputs)}")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """An H' x W' x K image → the K x H x W array to put in the input blob."""
        self._check_input(in_)
        caffe_in = np.array(data, dtype=np.float32)  # a copy: the caller's array is untouched
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if in_ in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            caffe_in *= self.raw_scale[in_]
        if in_ in self.mean:
            caffe_in -= self.mean[in_]
        if in_ in self.input_scale:
            caffe_in *= self.input_scale[in_]
        return caffe_in

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """Invert ``preprocess`` (but not its resize); ``data`` is squeezed first, as pycaffe."""
        self._check_input(in_)
        decaf_in = np.array(data).squeeze()
        if in_ in self.input_scale:
            decaf_in /= self.input_scale[in_]
        if in_ in self.mean:
            decaf_in += self.mean[in_]
        if in_ in self.raw_scale:
            decaf_in /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[in_]))
        return decaf_in

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """The axis order, e.g. (2, 0, 1) turns H x W x K into K x H x W."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise TransformerError(f"Transpose order needs to have the same number of "
                                   f"dimensions as the input: {len(self.inputs[in_]) - 1}, got "
                                   f"{tuple(order)}")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """The channel order after transposing, e.g. (2, 1, 0) turns RGB into BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise TransformerError(f"Channel swap needs to have the same number of dimensions "
                                   f"as the input channels: {self.inputs[in_][1]}, got "
                                   f"{tuple(order)}")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Multiply the raw image before the mean is subtracted (255 for [0, 255] models)."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """The mean to subtract: per channel (K,), or an image (K, H, W) / (H, W).

        An image mean of another size is resized to the input's H x W, as pycaffe does.
        """
        self._check_input(in_)
        mean = np.asarray(mean)
        if mean.ndim == 1:
            if mean.shape[0] != self.inputs[in_][1]:
                raise TransformerError(f"Mean channels incompatible with input: {mean.shape[0]} "
                                       f"values for {self.inputs[in_][1]} channels")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            ms = (1, *mean.shape) if mean.ndim == 2 else mean.shape
            if len(ms) != 3:
                raise TransformerError(f"Mean shape invalid: {mean.shape}; give (K,), (H, W) "
                                       "or (K, H, W)")
            in_shape = self.inputs[in_][1:]
            if ms != in_shape:
                m_min, m_max = float(mean.min()), float(mean.max())
                spread = (m_max - m_min) or 1.0
                normal = (mean.reshape(ms) - m_min) / spread
                resized = resize_image(normal.transpose((1, 2, 0)), in_shape[1:])
                mean = resized.transpose((2, 0, 1)) * spread + m_min
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Multiply after the mean is subtracted (``raw_scale`` acts before it)."""
        self._check_input(in_)
        self.input_scale[in_] = scale


__all__ = [
    "Transformer",
    "TransformerError",
    "array_to_blobproto",
    "array_to_datum",
    "arraylist_to_blobprotovector_str",
    "blobproto_to_array",
    "blobprotovector_str_to_arraylist",
    "datum_to_array",
    "load_image",
    "oversample",
    "resize_image",
]

