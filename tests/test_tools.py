"""Caffe's data tools end to end through ``engine.cli.main``: convert-imageset,
compute-image-mean and upgrade, and their one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from layer_helpers import make_layer
from PIL import Image

from engine import caffe_pb2
from engine.cli import main
from engine.data import parse_datum, read_lmdb, read_mean
from engine.data.datum import datum_to_array
from engine.io import read_net_param, read_text
from engine.layers.image_data import resize_linear

RNG = np.random.default_rng(11)
RGB = RNG.integers(0, 256, (4, 5, 3, 3), dtype=np.uint8)  # N, H, W, RGB
LABELS = [7, 0, 2, 9]


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    names = []
    for i, image in enumerate(RGB):
        names.append(f"sub {i}.png")
        Image.fromarray(image, "RGB").save(tmp_path / "img" / names[-1])
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{n} {lab}\n" for n, lab in zip(names, LABELS, strict=True)))
    return str(tmp_path / "img") + "/", str(listing), names


def bgr(i: int) -> np.ndarray:
    return RGB[i][:, :, ::-1].transpose(2, 0, 1)


def convert(images, db, *flags) -> int:
    root, listing, _ = images
    return main(["-q", "convert-imageset", *flags, root, listing, str(db)])


def test_convert_then_data_layer_reads_the_pixels(images, tmp_path):
    db = tmp_path / "db"
    assert convert(images, db) == 0
    records = read_lmdb(str(db))
    assert [k.decode() for k, _ in records] == [f"{i:08d}_{n}" for i, n in enumerate(images[2])]
    layer, top = make_layer(f'type: "Data" top: "data" top: "label" data_param {{ source: '
                            f'"{db}" batch_size: 4 backend: LMDB }}', [], n_top=2)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, np.stack([bgr(i) for i in range(4)]))
    np.testing.assert_array_equal(top[1].data, LABELS)


def test_convert_gray_resize(images, tmp_path):
    db = tmp_path / "db"
    assert convert(images, db, "--gray", "--resize_height", "4", "--resize_width", "6") == 0
    datum = parse_datum(read_lmdb(str(db))[1][1])
    assert (datum.channels, datum.height, datum.width, datum.label) == (1, 4, 6, LABELS[1])
    luma = (RGB[1].astype(np.int64) @ np.array([9797, 19234, 3737])) >> 15
    np.testing.assert_array_equal(datum_to_array(datum),
                                  resize_linear(luma[None].astype(np.uint8), 4, 6))


@pytest.mark.parametrize("flags, raw_file", [
    (["--encoded"], True),  # a PNG listed for PNG encoding is stored as its own bytes
    (["--encode_type", "jpg"], False),
    (["--encoded", "--gray"], False),  # channels change: re-encoded
])
def test_convert_encoded(images, tmp_path, flags, raw_file):
    db = tmp_path / "db"
    assert convert(images, db, *flags) == 0
    datum = parse_datum(read_lmdb(str(db))[2][1])
    assert datum.encoded and datum.label == LABELS[2]
    file_bytes = (tmp_path / "img" / images[2][2]).read_bytes()
    assert (datum.data == file_bytes) == raw_file
    decoded = datum_to_array(datum)
    if "jpg" in flags:
        assert decoded.shape == (3, 5, 3)
    elif "--gray" in flags:
        assert decoded.shape == (1, 5, 3)
    else:
        np.testing.assert_array_equal(decoded, bgr(2))


def test_convert_shuffle_is_a_permutation(images, tmp_path):
    db = tmp_path / "db"
    assert convert(images, db, "--shuffle") == 0
    records = read_lmdb(str(db))
    names = [k.decode()[9:] for k, _ in records]
    assert sorted(names) == sorted(images[2])
    for name, (_, value) in zip(names, records, strict=True):
        i = images[2].index(name)
        datum = parse_datum(value)
        assert datum.label == LABELS[i]
        np.testing.assert_array_equal(datum_to_array(datum), bgr(i))


def test_compute_image_mean(images, tmp_path, capsys):
    db, out = tmp_path / "db", tmp_path / "mean.binaryproto"
    assert convert(images, db) == 0
    assert main(["compute-image-mean", str(db), str(out)]) == 0
    expected = np.stack([bgr(i) for i in range(4)]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(read_mean(str(out)), expected, rtol=1e-6)
    proto = caffe_pb2.BlobProto.FromString(out.read_bytes())
    assert (proto.num, proto.channels, proto.height, proto.width) == (1, 3, 5, 3)
    err = capsys.readouterr().err
    for c in range(3):
        assert f"mean_value channel [{c}]: {expected[c].mean():g}" in err


V1_NET = """
name: "old"
layers { name: "data" type: DATA top: "data" top: "label"
  data_param { source: "db" batch_size: 2 } transform_param { scale: 0.5 } }
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip"
  blobs_lr: 1 blobs_lr: 2 inner_product_param { num_output: 3 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss" }
"""


def test_upgrade_v1_net(tmp_path):
    src, dst = tmp_path / "old.prototxt", tmp_path / "new.prototxt"
    src.write_text(V1_NET)
    assert main(["-q", "upgrade", str(src), str(dst)]) == 0
    net = read_text(dst, caffe_pb2.NetParameter)
    assert not len(net.layers)
    assert [(lay.name, lay.type) for lay in net.layer] == [
        ("data", "Data"), ("ip", "InnerProduct"), ("loss", "SoftmaxWithLoss")]
    assert [p.lr_mult for p in net.layer[1].param] == [1, 2]
    assert read_net_param(str(dst)) == net  # already current: nothing left to upgrade


def test_upgrade_solver(tmp_path):
    src, dst = tmp_path / "solver.prototxt", tmp_path / "new.prototxt"
    src.write_text('net: "net.prototxt"\nbase_lr: 0.01\nsolver_type: NESTEROV\n')
    assert main(["-q", "upgrade", str(src), str(dst)]) == 0
    solver = read_text(dst, caffe_pb2.SolverParameter)
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")
    assert solver.base_lr == pytest.approx(0.01) and not solver.HasField("snapshot_prefix")


@pytest.mark.parametrize("argv, message", [
    (["convert-imageset", "{root}", "{tmp}/nolist.txt", "{tmp}/db"], "cannot read the image list"),
    (["convert-imageset", "{tmp}/", "{list}", "{tmp}/db"], "none of the 4 images"),
    (["convert-imageset", "--resize_height", "3", "{root}", "{list}", "{tmp}/db"],
     "--resize_width together"),
    (["convert-imageset", "--backend", "leveldb", "{root}", "{list}", "{tmp}/db"],
     "only lmdb"),
    (["compute-image-mean", "{tmp}/nodb"], "does not exist"),
    (["upgrade", "{tmp}/none.prototxt", "{tmp}/out.prototxt"], "not found"),
])
def test_errors_are_one_line(images, tmp_path, capsys, argv, message):
    root, listing, _ = images
    argv = [a.format(root=root, list=listing, tmp=tmp_path) for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("engine: error: ") and message in err[-1]


def test_convert_check_size_error(images, tmp_path, capsys):
    root, _, names = images
    Image.fromarray(RGB[0][:4], "RGB").save(root + names[3])
    assert convert(images, tmp_path / "db", "--check_size") == 1
    assert "--check_size" in capsys.readouterr().err


def test_convert_refuses_existing_db(images, tmp_path, capsys):
    assert convert(images, tmp_path / "db") == 0
    assert convert(images, tmp_path / "db") == 1
    assert "already holds an LMDB" in capsys.readouterr().err
