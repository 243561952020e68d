"""Image decoding with OpenCV's conventions, through Pillow.

Caffe decodes encoded Datums and image files with OpenCV: channels come out in BGR(A) order,
8 bits per channel. ``decode_image`` reproduces ``cv::imdecode`` for the three flags Caffe uses:
native (``-1``, IMREAD_UNCHANGED: gray stays 1 channel, alpha is kept), color (3-channel BGR) and
gray. OpenCV's gray conversion differs by format and we match each bit for bit: JPEG asks the
decoder for its luma plane, PNG uses libpng's fixed-point weights, anything else ``cvtColor``'s.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.errors import DataError

# libpng's rgb_to_gray weights for OpenCV's (0.299, 0.587) in 1/32768 units, truncated
_PNG_GRAY = (9797, 19234, 3737)
# cv::cvtColor(RGB2GRAY) weights in 1/16384 units, rounded
_CV_GRAY = (4899, 9617, 1868)


def decode_image(buf: bytes, color: bool | None = None, where: str = "image") -> np.ndarray:
    """Decode JPEG/PNG/... bytes to a CHW uint8 array in OpenCV's channel order.

    ``color``: None keeps the file's channels (gray 1, BGR 3, BGRA 4); True gives BGR; False
    gives one gray channel. ``where`` names the record or file in error messages.
    """
    try:
        image = Image.open(io.BytesIO(buf))
        if color is False and image.format == "JPEG":
            image.draft("L", image.size)  # libjpeg's own luma, as OpenCV gets it
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError,
            TypeError, struct.error, Image.DecompressionBombError, MemoryError) as exc:
        # Pillow's decoders raise several of these on damaged bytes (SyntaxError: a broken PNG
        # chunk); a header claiming a gigantic image is a DecompressionBombError
        raise DataError(f"{where}: cannot decode the image bytes ({exc}); the data is not a "
                        f"valid JPEG/PNG or is truncated") from exc
    hwc = _to_opencv(image, color, where)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def read_image(path: str, color: bool | None = True) -> np.ndarray:
    """Read an image file as CHW uint8 (BGR when ``color``), like Caffe's ReadImageToCVMat."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as exc:
        raise DataError(f"cannot read image '{path}': {exc.strerror}") from exc
    return decode_image(buf, color, where=f"image '{path}'")


def encode_image(chw: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode a CHW uint8 array (BGR/BGRA or gray, as decoded) to PNG or JPEG bytes."""
    chw = np.asarray(chw)
    if chw.dtype != np.uint8 or chw.ndim != 3 or chw.shape[0] not in (1, 3, 4):
        raise DataError(f"can only encode CHW uint8 images with 1, 3 or 4 channels; got "
                        f"{chw.dtype} array of shape {chw.shape}")
    hwc = chw.transpose(1, 2, 0)
    if chw.shape[0] == 1:
        image = Image.fromarray(hwc[:, :, 0], "L")
    elif chw.shape[0] == 3:
        image = Image.fromarray(np.ascontiguousarray(hwc[:, :, ::-1]), "RGB")
    else:
        image = Image.fromarray(np.ascontiguousarray(hwc[:, :, [2, 1, 0, 3]]), "RGBA")
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _to_opencv(image: Image.Image, color: bool | None, where: str) -> np.ndarray:
    """HWC uint8 in OpenCV's layout for one of the three decode flags."""
    if image.mode.startswith("I") or image.mode == "F":
        if color is None:
            raise DataError(f"{where}: a {image.mode} (more than 8-bit) image; Caffe needs 8-bit "
                            f"images (set force_color or force_gray to convert it)")
        wide = np.asarray(image).astype(np.int64)
        return _gray_to(np.clip(wide >> 8, 0, 255).astype(np.uint8), color)
    if image.mode in ("1", "L"):
        return _gray_to(np.asarray(image.convert("L")), color)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    rgb = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    if color is False:
        return _rgb_to_gray(rgb, image.format)[:, :, None]
    if color is None and has_alpha:
        return rgb[:, :, [2, 1, 0, 3]]
    return rgb[:, :, 2::-1]


def _gray_to(gray: np.ndarray, color: bool | None) -> np.ndarray:
    if color:
        return np.repeat(gray[:, :, None], 3, axis=2)
    return gray[:, :, None]


def _rgb_to_gray(rgb: np.ndarray, fmt: str | None) -> np.ndarray:
    channels = rgb[:, :, :3].astype(np.int32)
    if fmt == "PNG":
        weights, shift, bias = _PNG_GRAY, 15, 0
    else:
        weights, shift, bias = _CV_GRAY, 14, 1 << 13
    total = channels @ np.asarray(weights, np.int32) + bias
    return (total >> shift).astype(np.uint8)
