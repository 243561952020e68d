"""``engine extract-features``: named blobs to LMDBs of float Datums, read back."""

from __future__ import annotations

import numpy as np
import pytest

from engine import caffe_pb2
from engine.cli import main
from engine.data.datum import array_to_datum
from engine.data.db import read_lmdb, write_lmdb
from engine.layer import TEST
from engine.net import Net

NET = """
name: "feat"
layer { name: "d" type: "Data" top: "data" top: "label"
  data_param { source: "images_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "y"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 }
    bias_filler { type: "gaussian" std: 1 } } }
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(5)
    images = rng.normal(size=(5, 1, 2, 3)).astype(np.float32)
    write_lmdb("images_lmdb", [(f"{i:08d}".encode(), array_to_datum(im, label=i)
                                .SerializeToString()) for i, im in enumerate(images)])
    (tmp_path / "net.prototxt").write_text(NET)
    net = Net("net.prototxt", phase=TEST, rng=np.random.default_rng(1))
    net.save("w.caffemodel")
    return images, net.params["ip"][0].data.copy(), net.params["ip"][1].data.copy()


def datums(path):
    out = []
    for key, value in read_lmdb(path):
        datum = caffe_pb2.Datum()
        datum.ParseFromString(value)
        out.append((key, datum))
    return out


def test_blobs_to_lmdb_and_back(workdir, capsys):
    images, weight, bias = workdir
    assert main(["extract-features", "--model", "net.prototxt", "--weights", "w.caffemodel",
                 "--blobs", "y,data", "--db", "y_db,data_db", "--iterations", "3"]) == 0
    order = [0, 1, 2, 3, 4, 0]  # 3 batches of 2 from 5 records: the source wraps
    ys = datums("y_db")
    assert [k for k, _ in ys] == [f"{i:010d}".encode() for i in range(6)]
    for (_, datum), i in zip(ys, order, strict=True):
        assert (datum.channels, datum.height, datum.width) == (4, 1, 1)
        assert not datum.data and not datum.encoded
        expected = images[i].reshape(-1) @ weight.T + bias
        np.testing.assert_allclose(datum.float_data, expected, rtol=1e-5)
    xs = datums("data_db")
    assert len(xs) == 6
    for (_, datum), i in zip(xs, order, strict=True):
        assert (datum.channels, datum.height, datum.width) == (1, 2, 3)
        np.testing.assert_array_equal(np.array(datum.float_data, np.float32),
                                      images[i].reshape(-1))
    assert "Extracted features of 6 query images for feature blob y" in capsys.readouterr().err


def test_one_folder_for_several_blobs_and_errors(workdir, capsys):
    assert main(["extract-features", "--model", "net.prototxt", "--weights", "w.caffemodel",
                 "--blobs", "y,data", "--db", "feats"]) == 0
    assert len(datums("feats/y")) == 2 and len(datums("feats/data")) == 2
    assert main(["extract-features", "--model", "net.prototxt", "--weights", "w.caffemodel",
                 "--blobs", "y", "--db", "feats/y"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["extract-features", "--model", "net.prototxt", "--blobs", "fc9",
                 "--db", "z"]) == 1
    assert "unknown feature blob name 'fc9'" in capsys.readouterr().err
