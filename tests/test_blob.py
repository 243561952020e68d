"""Blob: shapes, capacity, sharing and BlobProto conversion."""

from __future__ import annotations

import numpy as np
import pytest

from engine import caffe_pb2
from engine.blob import Blob, blob_proto_array, legacy_shape_matches


def test_shape_count_and_legacy_accessors():
    blob = Blob((2, 3, 4, 5))
    assert blob.shape == (2, 3, 4, 5) and blob.count == 120 and blob.num_axes == 4
    assert (blob.num, blob.channels, blob.height, blob.width) == (2, 3, 4, 5)
    assert blob.count_axes(1) == 60 and blob.count_axes(1, 3) == 12
    assert blob.data.dtype == np.float32 and blob.diff.shape == blob.shape


def test_reshape_accepts_dims_or_a_tuple():
    blob = Blob()
    blob.reshape(2, 3)
    assert blob.shape == (2, 3)
    blob.reshape((4,))
    assert blob.shape == (4,)


def test_capacity_only_grows_so_views_stay_valid():
    blob = Blob((4, 3))
    blob.data[...] = 7
    base = blob.data.base
    blob.reshape(2, 3)
    assert blob.data.base is base and np.all(blob.data == 7)
    blob.reshape(10, 3)
    assert blob.data.base is not base


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="non-negative"):
        Blob((2, -1))
    with pytest.raises(ValueError, match="at most 32 axes"):
        Blob((1,) * 33)


def test_share_data_and_diff():
    a, b = Blob((2, 6)), Blob((3, 4))
    b.share_data(a)
    b.share_diff(a)
    a.data[...] = np.arange(12).reshape(2, 6)
    assert b.data[2, 3] == 11 and b.shape == (3, 4)
    with pytest.raises(ValueError, match="counts differ"):
        Blob((5,)).share_data(a)


def test_proto_round_trip_float_and_double():
    for dtype in (np.float32, np.float64):
        blob = Blob((2, 3), dtype)
        blob.data[...] = np.random.default_rng(0).standard_normal((2, 3))
        blob.diff[...] = 2 * blob.data
        proto = caffe_pb2.BlobProto.FromString(blob.to_proto(write_diff=True).SerializeToString())
        back = Blob.from_proto(proto, dtype)
        np.testing.assert_array_equal(back.data, blob.data)
        np.testing.assert_array_equal(back.diff, blob.diff)
        assert list(proto.shape.dim) == [2, 3]
        assert len(proto.double_data if dtype == np.float64 else proto.data) == 6


def test_legacy_4d_shapes_align_to_the_end():
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=5, width=7)
    proto.data.extend(range(35))
    assert legacy_shape_matches(proto, (5, 7))
    assert not legacy_shape_matches(proto, (7, 5))
    bias = caffe_pb2.BlobProto(num=1, channels=1, height=1, width=5)
    assert legacy_shape_matches(bias, (5,))
    np.testing.assert_array_equal(blob_proto_array(proto, (5, 7))[1], np.arange(7, 14))


def test_truncated_proto_values_are_an_error():
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([2, 3])
    proto.data.extend([1.0, 2.0])
    with pytest.raises(ValueError, match="truncated"):
        blob_proto_array(proto, (2, 3))
