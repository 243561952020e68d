"""LMDB reading and writing, and mean .binaryproto files."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from engine import caffe_pb2
from engine.data import LMDBReader, open_db, read_lmdb, read_mean, write_lmdb, write_mean
from engine.data.db import LEVELDB, LMDB
from engine.errors import DataError

ITEMS = [(b"%03d" % i, b"value-%d" % i) for i in range(5)]


def test_write_then_read_in_key_order(tmp_path):
    assert write_lmdb(str(tmp_path / "db"), reversed(ITEMS)) == 5
    assert read_lmdb(str(tmp_path / "db")) == ITEMS


def test_the_map_grows_as_needed(tmp_path):
    big = [(b"%04d" % i, bytes(4096)) for i in range(300)]  # ~1.2 MB into a 64 KB map
    write_lmdb(str(tmp_path / "db"), big, map_size=1 << 16)
    assert len(read_lmdb(str(tmp_path / "db"))) == 300


def test_reader_wraps_seeks_and_logs(tmp_path, caplog):
    write_lmdb(str(tmp_path / "db"), ITEMS)
    reader = LMDBReader(str(tmp_path / "db"), where="layer 'd' (Data)")
    assert reader.size == 5 and reader.peek() == ITEMS[0]
    assert reader.read(3) == ITEMS[:3] and reader.position == 3
    with caplog.at_level(logging.INFO):
        assert reader.read(4) == ITEMS[3:] + ITEMS[:2]
    assert "layer 'd' (Data): Restarting data prefetching from start." in caplog.text
    reader.seek(9)
    assert reader.position == 4 and reader.read(1) == [ITEMS[4]] and reader.position == 0
    other = LMDBReader(str(tmp_path / "db"))  # a second reader shares the environment
    assert other.read(1) == [ITEMS[0]]


def test_open_db_backends(tmp_path):
    write_lmdb(str(tmp_path / "db"), ITEMS)
    assert open_db(str(tmp_path / "db"), LEVELDB).size == 5
    assert open_db(str(tmp_path / "db"), LMDB).size == 5
    (tmp_path / "level").mkdir()
    with pytest.raises(DataError, match="LEVELDB is not supported; convert it to LMDB"):
        open_db(str(tmp_path / "level"), LEVELDB, "layer 'x' (Data)")
    with pytest.raises(DataError, match=r"no data\.mdb"):
        open_db(str(tmp_path / "level"), LMDB)


def test_cannot_write_a_db_open_for_reading(tmp_path):
    write_lmdb(str(tmp_path / "db"), ITEMS)
    reader = LMDBReader(str(tmp_path / "db"))
    with pytest.raises(DataError, match="close its readers"):
        write_lmdb(str(tmp_path / "db"), ITEMS)
    reader.close()


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 2, 3, 3)])
def test_mean_round_trip_in_caffes_legacy_layout(tmp_path, shape):
    mean = np.random.default_rng(0).uniform(0, 255, shape)
    write_mean(str(tmp_path / "mean.binaryproto"), mean)
    proto = caffe_pb2.BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (proto.num, proto.channels) == (1, shape[-3]) and not proto.HasField("shape")
    back = read_mean(str(tmp_path / "mean.binaryproto"))
    assert back.shape == shape[-3:]
    np.testing.assert_array_equal(back, mean.reshape(shape[-3:]).astype(np.float32))


def test_mean_with_nd_shape(tmp_path):
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([1, 2, 1, 2])
    proto.data.extend([1, 2, 3, 4])
    (tmp_path / "m").write_bytes(proto.SerializeToString())
    np.testing.assert_array_equal(read_mean(str(tmp_path / "m")), [[[1, 2]], [[3, 4]]])


def test_mean_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"cannot read mean file '.*missing'"):
        read_mean(str(tmp_path / "missing"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        read_mean(str(tmp_path / "empty"))
    write_mean(str(tmp_path / "good"), np.ones((3, 4, 4)))
    raw = (tmp_path / "good").read_bytes()
    (tmp_path / "cut").write_bytes(raw[: len(raw) - 7])
    with pytest.raises(DataError, match=r"'.*cut'.*(truncated|corrupt)"):
        read_mean(str(tmp_path / "cut"))
    (tmp_path / "text").write_bytes(b"this is not a proto at all")
    with pytest.raises(DataError, match=r"'.*text'"):
        read_mean(str(tmp_path / "text"))
    flat = caffe_pb2.BlobProto()
    flat.data.extend([1.0, 2.0])
    (tmp_path / "flat").write_bytes(flat.SerializeToString())
    with pytest.raises(DataError, match="1xCxHxW"):
        read_mean(str(tmp_path / "flat"))
    with pytest.raises(DataError, match=r"\(C, H, W\)"):
        write_mean(str(tmp_path / "bad"), np.ones((2, 3, 4, 5)))
