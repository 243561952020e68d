"""Datum encode/decode and OpenCV-compatible image decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine import caffe_pb2
from engine.data import array_to_datum, datum_to_array, decode_image, encode_image, parse_datum
from engine.data.image import read_image
from engine.errors import DataError

RNG = np.random.default_rng(0)
BGR = RNG.integers(0, 256, (3, 9, 7), dtype=np.uint8)


def pil_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("array", [
    BGR,
    RNG.integers(0, 256, (1, 4, 5), dtype=np.uint8),
    RNG.normal(size=(2, 3, 4)).astype(np.float32),
])
def test_datum_round_trip(array):
    datum = parse_datum(array_to_datum(array, label=7).SerializeToString())
    assert (datum.channels, datum.height, datum.width, datum.label) == (*array.shape, 7)
    back = datum_to_array(datum)
    assert back.dtype == (np.uint8 if array.dtype == np.uint8 else np.float32)
    np.testing.assert_array_equal(back, array)
    assert len(datum.data) if array.dtype == np.uint8 else len(datum.float_data)


@pytest.mark.parametrize("array", [BGR, BGR[:1], np.concatenate([BGR, BGR[:1]])])
def test_encoded_png_datum_keeps_bgr_order(array):
    datum = array_to_datum(array, 3, encode="PNG")
    assert datum.encoded and datum.data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(datum_to_array(datum), array)


def test_datum_errors():
    with pytest.raises(DataError, match="3-d"):
        array_to_datum(np.zeros((2, 2)))
    datum = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc")
    with pytest.raises(DataError, match="declares 1x2x2 = 4 values but holds 3"):
        datum_to_array(datum)
    with pytest.raises(DataError, match="holds no pixels"):
        datum_to_array(caffe_pb2.Datum(channels=1, height=1, width=1))
    with pytest.raises(DataError, match="not a serialized Datum"):
        parse_datum(b"\xff\xff\xff", "record b'x'")
    with pytest.raises(DataError, match="cannot decode the image"):
        datum_to_array(caffe_pb2.Datum(encoded=True, data=b"\x89PNG truncated"))


def rgb_planes(rgb_hwc):
    return (rgb_hwc[..., i].astype(np.int64) for i in range(3))


def test_decode_modes_follow_opencv():
    rgb = BGR[::-1].transpose(1, 2, 0)
    png = pil_bytes(Image.fromarray(np.ascontiguousarray(rgb)))
    np.testing.assert_array_equal(decode_image(png), BGR)
    np.testing.assert_array_equal(decode_image(png, color=True), BGR)
    red, green, blue = rgb_planes(rgb)
    np.testing.assert_array_equal(decode_image(png, color=False)[0],
                                  (red * 9797 + green * 19234 + blue * 3737) >> 15)
    bmp = pil_bytes(Image.fromarray(np.ascontiguousarray(rgb)), "BMP")
    np.testing.assert_array_equal(decode_image(bmp, color=False)[0],
                                  (red * 4899 + green * 9617 + blue * 1868 + 8192) >> 14)
    gray = pil_bytes(Image.fromarray(BGR[0]))
    assert decode_image(gray).shape == (1, 9, 7)
    np.testing.assert_array_equal(decode_image(gray, color=True), np.stack([BGR[0]] * 3))
    rgba = RNG.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    decoded = decode_image(pil_bytes(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(decoded, rgba.transpose(2, 0, 1)[[2, 1, 0, 3]])
    assert decode_image(pil_bytes(Image.fromarray(rgba, "RGBA")), color=True).shape == (3, 5, 4)


def test_sixteen_bit_images():
    wide = RNG.integers(0, 65536, (4, 5), dtype=np.uint16)
    png = pil_bytes(Image.fromarray(wide))
    with pytest.raises(DataError, match="8-bit"):
        decode_image(png)
    np.testing.assert_array_equal(decode_image(png, color=False)[0], wide >> 8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
@pytest.mark.parametrize("flag", [None, True, False])
def test_decode_matches_cv2_imdecode(fmt, flag):
    cv2 = pytest.importorskip("cv2")
    rgb = np.ascontiguousarray(BGR[::-1].transpose(1, 2, 0))
    buf = pil_bytes(Image.fromarray(rgb), fmt)
    cv_flag = {None: cv2.IMREAD_UNCHANGED, True: cv2.IMREAD_COLOR,
               False: cv2.IMREAD_GRAYSCALE}[flag]
    expected = cv2.imdecode(np.frombuffer(buf, np.uint8), cv_flag)
    expected = expected.reshape(*expected.shape[:2], -1).transpose(2, 0, 1)
    np.testing.assert_array_equal(decode_image(buf, flag), expected)


def test_read_and_encode_image(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode_image(BGR))
    np.testing.assert_array_equal(read_image(str(path)), BGR)
    with pytest.raises(DataError, match="cannot read image"):
        read_image(str(tmp_path / "missing.png"))
    with pytest.raises(DataError, match="CHW uint8"):
        encode_image(BGR.astype(np.float32))
    jpeg = decode_image(encode_image(BGR, "JPEG"))
    assert jpeg.shape == BGR.shape
