"""caffe.io as pycaffe code uses it: ``import engine as caffe; caffe.io.Transformer(...)``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import engine as caffe
from engine import caffe_pb2

SHAPE = (1, 3, 6, 5)  # a net input: N, K, H, W


def imagenet_style(shape=SHAPE) -> caffe.io.Transformer:
    """pycaffe's classification-example configuration."""
    t = caffe.io.Transformer({"data": shape})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    t.set_input_scale("data", 0.5)
    return t


# -- Transformer --------------------------------------------------------------------------------
def test_io_is_engine_io_with_both_roles():
    assert caffe.io.__name__ == "engine.io"
    assert callable(caffe.io.read_net_param)  # Moka's file reader is still there
    assert callable(caffe.io.Transformer)


def test_preprocess_applies_the_steps_in_pycaffe_order(rng):
    image = rng.random((6, 5, 3)).astype(np.float32)
    out = imagenet_style().preprocess("data", image)
    chw = image.transpose(2, 0, 1)[[2, 1, 0]]
    expected = (chw * 255 - np.array([104.0, 117.0, 123.0])[:, None, None]) * 0.5
    assert out.dtype == np.float32
    assert out.shape == (3, 6, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_preprocess_then_deprocess_recovers_the_image(rng):
    image = rng.random((6, 5, 3)).astype(np.float32)
    t = imagenet_style()
    before = image.copy()
    back = t.deprocess("data", t.preprocess("data", image))
    np.testing.assert_allclose(back, image, atol=1e-5)
    np.testing.assert_array_equal(image, before)  # the caller's array is left alone


def test_round_trip_with_an_image_mean(rng):
    image = rng.random((6, 5, 3)).astype(np.float32)
    t = caffe.io.Transformer({"data": SHAPE})
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", rng.random((3, 6, 5)))
    np.testing.assert_allclose(t.deprocess("data", t.preprocess("data", image)), image,
                               atol=1e-6)


def test_preprocess_resizes_to_the_input_size(rng):
    t = caffe.io.Transformer({"data": SHAPE})
    t.set_transpose("data", (2, 0, 1))
    out = t.preprocess("data", rng.random((12, 10, 3)))
    assert out.shape == (3, 6, 5)


def test_mean_image_of_another_size_is_resized():
    t = caffe.io.Transformer({"data": SHAPE})
    t.set_mean("data", np.full((3, 12, 10), 7.0) + np.arange(3)[:, None, None])
    assert t.mean["data"].shape == (3, 6, 5)
    np.testing.assert_allclose(t.mean["data"][:, 2, 2], [7, 8, 9], atol=1e-5)


@pytest.mark.parametrize(("call", "args"), [
    ("set_mean", (np.zeros(4),)),          # 4 channel means for 3 channels
    ("set_mean", (np.zeros((2, 2, 3, 4)),)),
    ("set_transpose", ((1, 0),)),
    ("set_channel_swap", ((1, 0),)),
])
def test_settings_that_do_not_fit_the_input_raise(call, args):
    t = caffe.io.Transformer({"data": SHAPE})
    with pytest.raises(ValueError):
        getattr(t, call)("data", *args)


def test_unknown_input_is_named():
    t = caffe.io.Transformer({"data": SHAPE})
    with pytest.raises(Exception, match="label is not one of the net inputs"):
        t.set_raw_scale("label", 255)


# -- resize_image and oversample ----------------------------------------------------------------
def test_resize_upsampling_blends_with_zero_beyond_the_edge():
    # pixel centres: output x reads input (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25; outside
    # the image is 0 in the [0, 1]-scaled image (skimage's mode='constant'), i.e. the minimum.
    im = np.array([[[2.0], [6.0]]])
    out = caffe.io.resize_image(im, (1, 4))
    np.testing.assert_allclose(out[0, :, 0], [2, 3, 5, 5], atol=1e-6)
    assert out.dtype == np.float32


def test_resize_matches_scikit_image_goldens():
    # skimage.transform.resize(order=1, mode='constant') on the [0, 1]-scaled image, as pycaffe
    # calls it; generated once with scikit-image 0.26 (anti-aliasing when downsampling).
    im = np.array([[0, 2, 5, 1], [3, 7, 4, 6], [8, 1, 0, 2]], np.float32)[:, :, None]
    wide = [[0.625768, 2.000377, 3.499567, 4.498506, 3.499246, 1.87521],
            [5.622416, 4.623617, 2.250405, 1.250684, 2.000252, 2.49979]]
    tall = [[0.266667, 2.8, 1.333333], [1.666667, 4.3, 3.266667], [3.666667, 5.5, 5.666667],
            [5.566667, 2.5, 3.266667], [5.466667, 0.4, 1.333333]]
    np.testing.assert_allclose(caffe.io.resize_image(im, (2, 6))[:, :, 0], wide, atol=2e-6)
    np.testing.assert_allclose(caffe.io.resize_image(im, (5, 3))[:, :, 0], tall, atol=2e-6)


def test_resize_of_a_constant_image_stays_constant():
    out = caffe.io.resize_image(np.full((4, 4, 3), 0.3), (7, 2))
    assert out.shape == (7, 2, 3)
    np.testing.assert_allclose(out, 0.3, rtol=1e-6)


def test_resize_of_other_channel_counts_maps_corners_to_corners():
    im = np.zeros((1, 2, 2))
    im[0, 1] = [4.0, 8.0]
    out = caffe.io.resize_image(im, (1, 3))  # scipy.ndimage.zoom: x_in = x_out * (2-1)/(3-1)
    np.testing.assert_allclose(out[0], [[0, 0], [2, 4], [4, 8]])


def test_resize_nearest_neighbour(rng):
    im = rng.random((3, 3, 3))
    out = caffe.io.resize_image(im, (3, 3), interp_order=0)
    np.testing.assert_allclose(out, im, rtol=1e-6)


def test_oversample_gives_corners_centre_and_mirrors(rng):
    images = rng.random((2, 6, 7, 3)).astype(np.float32)
    crops = caffe.io.oversample(images, (4, 4))
    assert crops.shape == (20, 4, 4, 3)
    second = images[1]
    expected = [second[:4, :4], second[:4, 3:], second[2:, :4], second[2:, 3:],
                second[1:5, 1:5]]  # centre: int(3 - 2), int(3.5 - 2)
    for k, crop in enumerate(expected):
        np.testing.assert_array_equal(crops[10 + k], crop)
        np.testing.assert_array_equal(crops[15 + k], crop[:, ::-1])


# -- images -------------------------------------------------------------------------------------
def test_load_image_color_and_gray(tmp_path, rng):
    pixels = (rng.random((5, 4, 3)) * 255).astype(np.uint8)
    path = str(tmp_path / "x.png")
    Image.fromarray(pixels).save(path)
    color = caffe.io.load_image(path)
    assert color.shape == (5, 4, 3)
    assert color.dtype == np.float32
    np.testing.assert_allclose(color, pixels / 255.0, atol=1e-6)
    gray = caffe.io.load_image(path, color=False)
    assert gray.shape == (5, 4, 1)
    np.testing.assert_allclose(gray[:, :, 0], pixels / 255.0 @ [0.2125, 0.7154, 0.0721],
                               atol=1e-6)


def test_load_image_of_a_gray_file_tiles_to_three_channels(tmp_path, rng):
    pixels = (rng.random((3, 2)) * 255).astype(np.uint8)
    path = str(tmp_path / "g.png")
    Image.fromarray(pixels, "L").save(path)
    color = caffe.io.load_image(path)
    assert color.shape == (3, 2, 3)
    for k in range(3):
        np.testing.assert_allclose(color[:, :, k], pixels / 255.0, atol=1e-6)
    assert caffe.io.load_image(path, color=False).shape == (3, 2, 1)


def test_load_image_drops_alpha(tmp_path, rng):
    pixels = (rng.random((3, 2, 4)) * 255).astype(np.uint8)
    path = str(tmp_path / "a.png")
    Image.fromarray(pixels, "RGBA").save(path)
    np.testing.assert_allclose(caffe.io.load_image(path), pixels[:, :, :3] / 255.0, atol=1e-6)


# -- protos and datums --------------------------------------------------------------------------
def test_blobproto_round_trip_with_diff(rng):
    arr, diff = rng.random((2, 3, 4)), rng.random((2, 3, 4))
    blob = caffe.io.array_to_blobproto(arr, diff)
    assert list(blob.shape.dim) == [2, 3, 4]
    np.testing.assert_allclose(caffe.io.blobproto_to_array(blob), arr, rtol=1e-6)
    np.testing.assert_allclose(caffe.io.blobproto_to_array(blob, return_diff=True), diff,
                               rtol=1e-6)


def test_blobproto_legacy_shape_and_missing_shape():
    blob = caffe_pb2.BlobProto()
    blob.data.extend([0.0] * 100)
    with pytest.raises(ValueError):
        caffe.io.blobproto_to_array(blob)  # 100 values, no shape
    blob.num, blob.channels, blob.height, blob.width = 1, 1, 10, 10
    assert caffe.io.blobproto_to_array(blob).shape == (1, 1, 10, 10)
    scalar = caffe_pb2.BlobProto()
    scalar.data.append(123)
    assert caffe.io.blobproto_to_array(scalar) == 123


def test_blobprotovector_string_round_trip(rng):
    arrays = [rng.random((2, 3)), rng.random(5)]
    serialized = caffe.io.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(serialized, bytes)
    back = caffe.io.blobprotovector_str_to_arraylist(serialized)
    assert len(back) == 2
    for a, b in zip(arrays, back, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6)


def test_datum_round_trips_uint8_as_bytes_and_floats_as_float_data(rng):
    pixels = (rng.random((3, 4, 5)) * 255).astype(np.uint8)
    datum = caffe.io.array_to_datum(pixels, label=7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 4, 5, 7)
    assert datum.data == pixels.tobytes()
    np.testing.assert_array_equal(caffe.io.datum_to_array(datum), pixels)
    floats = rng.random((1, 2, 3))
    datum = caffe.io.array_to_datum(floats)
    assert not datum.data
    assert not datum.HasField("label")
    np.testing.assert_allclose(caffe.io.datum_to_array(datum), floats, rtol=1e-6)


def test_datum_without_label_is_smaller():
    with_label = caffe.io.array_to_datum(np.ones((10, 10, 3)), label=1)
    without = caffe.io.array_to_datum(np.ones((10, 10, 3)))
    assert len(with_label.SerializeToString()) > len(without.SerializeToString())


def test_datum_needs_three_axes():
    with pytest.raises(ValueError, match="Incorrect array shape"):
        caffe.io.array_to_datum(np.zeros((2, 2)))
