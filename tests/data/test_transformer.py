"""DataTransformer details beyond the Data layer tests: Caffe's quirks and the list path."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from engine import caffe_pb2
from engine.data import DataTransformer
from engine.errors import DataError
from engine.layer import TEST, TRAIN

IMAGES = np.random.default_rng(1).integers(0, 256, (6, 2, 5, 4), dtype=np.uint8)


def transformer(text: str, phase: int = TRAIN) -> DataTransformer:
    param = text_format.Parse(text, caffe_pb2.TransformationParameter())
    return DataTransformer(param, phase, "layer 't' (Data)")


def test_mirror_is_random_in_test_phase_too():
    t = transformer("mirror: true", TEST)
    out = np.empty(IMAGES.shape)
    t.transform(IMAGES, out, np.random.default_rng(0))
    flips = np.random.default_rng(0).integers(0, 2, 6).astype(bool)
    assert flips.any() and not flips.all()
    np.testing.assert_array_equal(out[flips], IMAGES[flips][..., ::-1])
    np.testing.assert_array_equal(out[~flips], IMAGES[~flips])


def test_varying_sizes_draw_offsets_from_each_images_range():
    images = [IMAGES[0], IMAGES[1, :, :4, :3], IMAGES[2, :, :3, :3]]
    t = transformer("crop_size: 3")
    out = np.empty((3, 2, 3, 3), np.float32)
    t.transform(images, out, np.random.default_rng(4))
    rng = np.random.default_rng(4)
    h_off = rng.integers(0, np.array([3, 2, 1]))
    w_off = rng.integers(0, np.array([2, 1, 1]))
    for image, crop, h, w in zip(images, out, h_off, w_off, strict=True):
        np.testing.assert_array_equal(crop, image[:, h:h + 3, w:w + 3])


def test_identity_and_shapes():
    assert not transformer("").active
    assert transformer("scale: 2").active
    assert transformer("crop_size: 3").infer_shape((2, 5, 4)) == (2, 3, 3)
    out = np.empty(IMAGES.shape, np.float32)
    transformer("").transform(list(IMAGES), out, np.random.default_rng())
    np.testing.assert_array_equal(out, IMAGES)


def test_errors_name_the_layer():
    with pytest.raises(DataError, match=r"layer 't' \(Data\): crop_size 6 is larger"):
        transformer("crop_size: 6").infer_shape((2, 5, 4))
    with pytest.raises(DataError, match="does not fit the batch"):
        transformer("").transform(IMAGES, np.empty((6, 2, 4, 4)), np.random.default_rng())
