"""Data layers: Input, DummyData, Data (LMDB), HDF5Data and MemoryData.

Fixtures (tiny LMDBs and HDF5 files) are written into tmp_path by the tests themselves. Data
layers have no bottoms and no parameters, so there is no gradient to check; their backward is a
no-op, checked once.
"""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
from layer_helpers import forward_tops, make_layer

from engine.blob import Blob
from engine.data import array_to_datum, write_lmdb, write_mean
from engine.errors import DataError, LayerError
from engine.layer import TEST, TRAIN

RNG = np.random.default_rng(5)
IMAGES = RNG.integers(0, 256, (7, 3, 6, 5), dtype=np.uint8)
LABELS = np.arange(7) * 10 + 1


def write_db(path, images=IMAGES, labels=LABELS, encode=None, keys=None) -> str:
    keys = keys or [f"{i:08d}".encode() for i in range(len(images))]
    items = [(k, array_to_datum(im, lab, encode).SerializeToString())
             for k, im, lab in zip(keys, images, labels, strict=True)]
    write_lmdb(str(path), items)
    return str(path)


def data_layer(source, batch=3, extra="", n_top=2, phase=TRAIN, seed=0, dtype=np.float64,
               backend="LMDB"):
    text = (f'type: "Data" top: "data" top: "label" data_param {{ source: "{source}" '
            f'batch_size: {batch} backend: {backend} }} {extra}')
    return make_layer(text, [], n_top=n_top, phase=phase, seed=seed, dtype=dtype)


# -- Input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes, n_top, expected", [
    ("shape { dim: 2 dim: 3 }", 1, [(2, 3)]),
    ("shape { dim: 2 dim: 3 dim: 4 dim: 5 }", 2, [(2, 3, 4, 5)] * 2),
    ("shape { dim: 1 } shape { dim: 4 dim: 2 }", 2, [(1,), (4, 2)]),
    ("", 1, [()]),
])
def test_input_shapes(shapes, n_top, expected):
    layer, top = make_layer(f'type: "Input" input_param {{ {shapes} }}', [], n_top=n_top)
    assert [t.shape for t in top] == expected
    top[0].data[...] = 7.0
    layer.forward([], top)
    assert np.all(top[0].data == 7.0)


def test_input_reshape_keeps_the_users_shape():
    layer, top = make_layer('type: "Input" input_param { shape { dim: 2 dim: 3 } }', [])
    top[0].reshape((5, 3))
    layer.reshape([], top)
    assert top[0].shape == (5, 3)


def test_input_shape_count_must_fit_the_tops():
    with pytest.raises(LayerError, match="once per top"):
        make_layer('type: "Input" input_param { shape { dim: 1 } shape { dim: 2 } }', [],
                   n_top=3)


# -- DummyData -----------------------------------------------------------------------------------
@pytest.mark.parametrize("param, n_top, shapes", [
    ("shape { dim: 2 dim: 3 }", 2, [(2, 3), (2, 3)]),
    ("shape { dim: 2 } shape { dim: 4 dim: 1 }", 2, [(2,), (4, 1)]),
    ("num: 2 channels: 3 height: 4 width: 5", 1, [(2, 3, 4, 5)]),
    ("num: 2 num: 6 channels: 3 height: 1 width: 1", 2, [(2, 3, 1, 1), (6, 3, 1, 1)]),
])
def test_dummy_data_shapes_and_default_zero(param, n_top, shapes):
    layer, top = make_layer(f'type: "DummyData" dummy_data_param {{ {param} }}', [],
                            n_top=n_top)
    assert [t.shape for t in top] == shapes
    forward_tops(layer, top)
    assert all(np.all(t.data == 0) for t in top)


def test_dummy_data_constant_is_filled_once_and_random_every_forward():
    text = ('type: "DummyData" dummy_data_param { shape { dim: 3 dim: 4 } '
            'data_filler { type: "constant" value: 2.5 } '
            'data_filler { type: "uniform" min: -1 max: 1 } }')
    layer, top = make_layer(text, [], n_top=2, seed=3)
    assert np.all(top[0].data == 2.5)
    assert np.all(top[1].data == 0)  # Caffe fills non-constant tops at forward only
    top[0].data[0, 0] = -9.0
    rng = np.random.default_rng(3)
    first = forward_tops(layer, top)
    assert first[0][0, 0] == -9.0  # the constant top is not refilled
    np.testing.assert_array_equal(first[1], rng.uniform(-1, 1, (3, 4)))
    second = forward_tops(layer, top)
    np.testing.assert_array_equal(second[1], rng.uniform(-1, 1, (3, 4)))


def test_dummy_data_one_filler_for_all_tops():
    text = ('type: "DummyData" dummy_data_param { shape { dim: 2 } shape { dim: 3 } '
            'data_filler { type: "gaussian" std: 2 } }')
    layer, top = make_layer(text, [], n_top=2, seed=1)
    values = forward_tops(layer, top)
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(values[0], rng.normal(0, 2, (2,)))
    np.testing.assert_array_equal(values[1], rng.normal(0, 2, (3,)))


@pytest.mark.parametrize("param, n_top, match", [
    ("shape { dim: 1 } data_filler { } data_filler { }", 3, "data_filler"),
    ("shape { dim: 1 } shape { dim: 1 }", 3, "shape once"),
    ("num: 1 channels: 1 height: 1 width: 1 shape { dim: 1 }", 1, "not both"),
    ("num: 1 num: 2 channels: 1 height: 1 width: 1", 3, "num once"),
])
def test_dummy_data_errors(param, n_top, match):
    with pytest.raises(LayerError, match=match):
        make_layer(f'type: "DummyData" dummy_data_param {{ {param} }}', [], n_top=n_top)


# -- Data: reading -------------------------------------------------------------------------------
def test_data_reads_records_in_key_order_and_wraps(tmp_path, caplog):
    order = [3, 0, 6, 1, 5, 2, 4]  # inserted out of order; LMDB serves them sorted by key
    source = write_db(tmp_path / "db", IMAGES[order], LABELS[order],
                      keys=[f"{i:08d}".encode() for i in order])
    layer, top = data_layer(source)
    assert top[0].shape == (3, 3, 6, 5) and top[1].shape == (3,)
    served = []
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            data, label = forward_tops(layer, top)
            served.append((data, label))
    assert "Restarting data prefetching from start" in caplog.text
    rows = [0, 1, 2, 3, 4, 5, 6, 0, 1]
    np.testing.assert_array_equal(np.concatenate([d for d, _ in served]), IMAGES[rows])
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in served]), LABELS[rows])
    assert top[0].data.dtype == np.float64


def test_data_float32_net_and_single_top(tmp_path):
    layer, top = data_layer(write_db(tmp_path / "db"), batch=2, n_top=1, dtype=np.float32)
    (data,) = forward_tops(layer, top)
    assert data.dtype == np.float32 and data.shape == (2, 3, 6, 5)
    np.testing.assert_array_equal(data, IMAGES[:2])


def test_data_float_datums(tmp_path):
    images = RNG.normal(size=(4, 2, 3, 3)).astype(np.float32)
    layer, top = data_layer(write_db(tmp_path / "db", images, [0, 1, 2, 3]), batch=4)
    data, label = forward_tops(layer, top)
    np.testing.assert_array_equal(data, images)
    np.testing.assert_array_equal(label, [0, 1, 2, 3])


@pytest.mark.parametrize("force, channels", [("", 3), ("force_gray: true", 1),
                                             ("force_color: true", 3)])
def test_data_png_encoded_records(tmp_path, force, channels):
    source = write_db(tmp_path / "db", encode="PNG")
    layer, top = data_layer(source, batch=7, extra=f"transform_param {{ {force} }}")
    data, _ = forward_tops(layer, top)
    assert data.shape == (7, channels, 6, 5)
    if channels == 3:
        np.testing.assert_array_equal(data, IMAGES)  # BGR in, BGR out
    else:
        blue, green, red = (IMAGES[:, i].astype(np.int64) for i in range(3))
        gray = (red * 9797 + green * 19234 + blue * 3737) >> 15  # libpng, as OpenCV decodes
        np.testing.assert_array_equal(data[:, 0], gray)


def test_data_rand_skip(tmp_path):
    source = write_db(tmp_path / "db")
    text = f'type: "Data" data_param {{ source: "{source}" batch_size: 1 rand_skip: 5 }}'
    layer, top = make_layer(text, [], n_top=1, seed=4)
    skip = int(np.random.default_rng(4).integers(0, 5))
    assert layer.get_state() == {"cursor": skip}
    np.testing.assert_array_equal(forward_tops(layer, top)[0], IMAGES[skip:skip + 1])


def test_data_varying_sizes_need_a_crop(tmp_path):
    images = [RNG.integers(0, 256, (1, h, w), dtype=np.uint8) for h, w in [(4, 4), (5, 6)]]
    source = str(tmp_path / "db")
    write_lmdb(source, [(b"%d" % i, array_to_datum(im, 0).SerializeToString())
                        for i, im in enumerate(images)])
    layer, top = data_layer(source, batch=2, phase=TEST, extra="transform_param { crop_size: 3 }")
    data, _ = forward_tops(layer, top)
    np.testing.assert_array_equal(data[0, 0], images[0][0, 0:3, 0:3])
    np.testing.assert_array_equal(data[1, 0], images[1][0, 1:4, 1:4])
    layer, top = data_layer(source, batch=2)
    with pytest.raises(DataError, match="size of the first"):
        forward_tops(layer, top)


# -- Data: transform_param -----------------------------------------------------------------------
def caffe_transform(images, phase, rng, crop=0, mirror=False, mean=None, scale=1.0):
    """Caffe's per-element loop; draws as documented: mirror coins, row offsets, column offsets."""
    n, c, h, w = images.shape
    flips = rng.integers(0, 2, n).astype(bool) if mirror else np.zeros(n, bool)
    size_h, size_w = (crop, crop) if crop else (h, w)
    if crop and phase == TRAIN:
        h_off = rng.integers(0, np.full(n, h - crop + 1))
        w_off = rng.integers(0, np.full(n, w - crop + 1))
    else:
        h_off = np.full(n, (h - size_h) // 2)
        w_off = np.full(n, (w - size_w) // 2)
    mean = np.broadcast_to(np.zeros((c, 1, 1)) if mean is None else mean, (c, h, w))
    out = np.zeros((n, c, size_h, size_w))
    for i in range(n):
        for ch in range(c):
            for y in range(size_h):
                for x in range(size_w):
                    xx = size_w - 1 - x if flips[i] else x
                    src = (ch, h_off[i] + y, w_off[i] + x)
                    out[i, ch, y, xx] = (images[i][src] - mean[src]) * scale
    return out, h_off, w_off


MEAN = RNG.uniform(0, 255, (3, 6, 5))


@pytest.mark.parametrize("phase", [TRAIN, TEST])
@pytest.mark.parametrize("param, crop, mirror, mean, scale", [
    ("", 0, False, None, 1.0),
    ("scale: 0.00390625", 0, False, None, 0.00390625),
    ("crop_size: 3", 3, False, None, 1.0),
    ("crop_size: 4 mirror: true", 4, True, None, 1.0),
    ("mirror: true", 0, True, None, 1.0),
    ("mean_value: 100", 0, False, np.full((3, 1, 1), 100.0), 1.0),
    ("mean_value: 10 mean_value: 20 mean_value: 30 crop_size: 2", 2, False,
     np.array([10.0, 20.0, 30.0]).reshape(3, 1, 1), 1.0),
    ("mean_file: 'MEAN' crop_size: 3 mirror: true scale: 0.5", 3, True, MEAN, 0.5),
    ("mean_file: 'MEAN'", 0, False, MEAN, 1.0),
])
def test_data_transform_matches_caffes_loop(tmp_path, phase, param, crop, mirror, mean, scale):
    write_mean(str(tmp_path / "mean.binaryproto"), MEAN)
    param = param.replace("MEAN", str(tmp_path / "mean.binaryproto"))
    layer, top = data_layer(write_db(tmp_path / "db"), batch=7, phase=phase, seed=11,
                            extra=f"transform_param {{ {param} }}")
    assert top[0].shape == (7, 3, crop or 6, crop or 5)
    data, _ = forward_tops(layer, top)
    mean32 = None if mean is None else np.asarray(mean, np.float32)
    expected, h_off, w_off = caffe_transform(IMAGES, phase, np.random.default_rng(11), crop,
                                             mirror, mean32, scale)
    np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-9)
    if crop and phase == TEST:
        assert set(h_off) == {(6 - crop) // 2} and set(w_off) == {(5 - crop) // 2}


def test_data_train_crop_is_a_valid_window(tmp_path):
    layer, top = data_layer(write_db(tmp_path / "db"), batch=7, seed=2,
                            extra="transform_param { crop_size: 3 }")
    data, _ = forward_tops(layer, top)
    for image, crop in zip(IMAGES, data, strict=True):
        windows = np.lib.stride_tricks.sliding_window_view(image, (3, 3), axis=(1, 2))
        assert any(np.array_equal(windows[:, y, x], crop)
                   for y in range(4) for x in range(3))


def test_data_float32_matches_caffes_float_arithmetic(tmp_path):
    write_mean(str(tmp_path / "m"), MEAN)
    layer, top = data_layer(write_db(tmp_path / "db"), batch=7, dtype=np.float32,
                            extra=f"transform_param {{ mean_file: '{tmp_path / 'm'}' "
                                  f"scale: 0.017 }}")
    data, _ = forward_tops(layer, top)
    expected = (IMAGES.astype(np.float32) - MEAN.astype(np.float32)) * np.float32(0.017)
    np.testing.assert_array_equal(data, expected)


def test_data_legacy_data_param_transform_fields(tmp_path):
    text = (f'type: "Data" data_param {{ source: "{write_db(tmp_path / "db")}" batch_size: 2 '
            f'backend: LMDB scale: 0.5 }}')
    layer, top = make_layer(text, [], n_top=1)
    np.testing.assert_array_equal(forward_tops(layer, top)[0], IMAGES[:2] * 0.5)


# -- Data: resume --------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", ["", "transform_param { crop_size: 3 mirror: true }"])
def test_data_get_state_set_state_resumes_exactly(tmp_path, extra):
    source = write_db(tmp_path / "db")
    layer, top = data_layer(source, batch=3, extra=extra, seed=8)
    forward_tops(layer, top)
    forward_tops(layer, top)
    state, rng_state = layer.get_state(), layer.rng.bit_generator.state
    assert state == {"cursor": 6}
    expected = [forward_tops(layer, top) for _ in range(3)]

    resumed, top2 = data_layer(source, batch=3, extra=extra, seed=99)
    resumed.set_state(state)
    resumed.rng.bit_generator.state = rng_state
    for want in expected:
        got = forward_tops(resumed, top2)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_two_layers_can_read_one_db(tmp_path):
    source = write_db(tmp_path / "db")
    first, top1 = data_layer(source, batch=2)
    second, top2 = data_layer(source, batch=5, phase=TEST)
    forward_tops(first, top1)
    np.testing.assert_array_equal(forward_tops(second, top2)[0], IMAGES[:5])
    np.testing.assert_array_equal(forward_tops(first, top1)[0], IMAGES[2:4])


# -- Data: errors --------------------------------------------------------------------------------
def test_leveldb_backend_reads_an_lmdb_directory(tmp_path):
    layer, top = data_layer(write_db(tmp_path / "db"), batch=2, backend="LEVELDB")
    np.testing.assert_array_equal(forward_tops(layer, top)[0], IMAGES[:2])


def test_data_source_errors(tmp_path):
    (tmp_path / "leveldb").mkdir()
    (tmp_path / "leveldb" / "CURRENT").write_text("MANIFEST-000001\n")
    with pytest.raises(DataError, match="convert it to LMDB"):
        data_layer(tmp_path / "leveldb", backend="LEVELDB")
    with pytest.raises(DataError, match=r"layer 'data' \(Data\).*does not exist"):
        data_layer(tmp_path / "missing")
    with pytest.raises(DataError, match="does not exist"):
        data_layer(tmp_path / "missing", backend="LEVELDB")
    write_lmdb(str(tmp_path / "empty"), [])
    with pytest.raises(DataError, match="empty"):
        data_layer(tmp_path / "empty")
    with pytest.raises(LayerError, match="batch_size must be positive"):
        data_layer(write_db(tmp_path / "db"), batch=0)


def test_data_record_errors(tmp_path):
    images = [IMAGES[0], IMAGES[1, :, :5, :4]]
    source = str(tmp_path / "db")
    write_lmdb(source, [(b"%d" % i, array_to_datum(im, 0).SerializeToString())
                        for i, im in enumerate(images)] + [(b"9", b"\xff\xfenot a datum")])
    layer, top = data_layer(source, batch=2)
    with pytest.raises(DataError, match=r"3x5x4 does not fit the batch of 3x6x5"):
        forward_tops(layer, top)
    layer.set_state({"cursor": 2})
    with pytest.raises(DataError, match=r"record b'9'.*not a serialized Datum"):
        forward_tops(layer, top)


@pytest.mark.parametrize("param, match", [
    ("crop_size: 7", "crop_size 7 is larger than the 6x5 image"),
    ("mean_file: 'MEAN' mean_value: 3", "mean_file and mean_value cannot both be given"),
    ("mean_value: 1 mean_value: 2", "mean_value has 2 values but the images have 3 channels"),
    ("mean_file: 'nowhere.binaryproto'", "cannot read mean file 'nowhere.binaryproto'"),
    ("mean_file: 'SMALL'", "is 3x5x5 but the images are 3x6x5"),
    ("force_color: true force_gray: true", "cannot both be set"),
])
def test_transform_param_errors(tmp_path, param, match):
    write_mean(str(tmp_path / "mean"), MEAN)
    write_mean(str(tmp_path / "small"), MEAN[:, :5])
    param = param.replace("MEAN", str(tmp_path / "mean")).replace("SMALL", str(tmp_path / "small"))
    with pytest.raises(DataError, match=match):
        data_layer(write_db(tmp_path / "db"), extra=f"transform_param {{ {param} }}")


def test_data_layers_have_no_gradient(tmp_path):
    layer, top = data_layer(write_db(tmp_path / "db"))
    forward_tops(layer, top)
    before = [t.data.copy() for t in top]
    layer.backward(top, [], [])
    assert layer.blobs == [] and all(np.array_equal(a, t.data) for a, t in zip(before, top,
                                                                                 strict=True))


# -- HDF5Data ------------------------------------------------------------------------------------
def write_h5(path, **datasets) -> str:
    with h5py.File(path, "w") as f:
        for name, array in datasets.items():
            f[name] = array
    return str(path)


@pytest.fixture
def h5_files(tmp_path):
    """Two files of 3 and 4 rows: data (rows, 2, 3), label (rows,); rows numbered 0..6."""
    rows = np.arange(7)
    data = rows[:, None, None] * 100 + np.arange(6).reshape(1, 2, 3)
    write_h5(tmp_path / "a.h5", data=data[:3].astype(np.float32), label=rows[:3])
    write_h5(tmp_path / "b.h5", data=data[3:].astype(np.float32), label=rows[3:])
    listing = tmp_path / "list.txt"
    listing.write_text("a.h5\n\nb.h5\n")
    return str(listing), data


def hdf5_layer(source, batch=3, shuffle=False, seed=0, extra=""):
    text = (f'type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: "{source}" '
            f'batch_size: {batch} shuffle: {str(shuffle).lower()} }} {extra}')
    return make_layer(text, [], n_top=2, seed=seed)


def test_hdf5_batches_cross_files_and_wrap(h5_files):
    source, data = h5_files
    layer, top = hdf5_layer(source, batch=3)
    assert top[0].shape == (3, 2, 3) and top[1].shape == (3,)
    labels = np.concatenate([forward_tops(layer, top)[1] for _ in range(4)])
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4])
    layer, top = hdf5_layer(source, batch=5)
    forward_tops(layer, top)
    got, label = forward_tops(layer, top)
    np.testing.assert_array_equal(label, [5, 6, 0, 1, 2])
    np.testing.assert_array_equal(got, data[[5, 6, 0, 1, 2]])


def test_hdf5_list_paths_relative_to_cwd_first(h5_files, tmp_path, monkeypatch):
    source, _ = h5_files
    other = tmp_path / "cwd"
    other.mkdir()
    write_h5(other / "a.h5", data=np.full((1, 2, 3), -1.0), label=np.array([-1]))
    monkeypatch.chdir(other)
    layer, top = hdf5_layer(source, batch=2)
    np.testing.assert_array_equal(forward_tops(layer, top)[1], [-1, 3])


def test_hdf5_shuffle_is_a_permutation_every_epoch(h5_files):
    source, data = h5_files
    layer, top = hdf5_layer(source, batch=7, shuffle=True, seed=3)
    epochs = [forward_tops(layer, top) for _ in range(4)]
    for got, label in epochs:
        assert sorted(label) == list(range(7))
        np.testing.assert_array_equal(got, data[label.astype(int)])
        rows = label.astype(int).tolist()
        assert {0, 1, 2} in (set(rows[:3]), set(rows[4:]))  # rows stay grouped by file
    assert len({tuple(label) for _, label in epochs}) > 1


def test_hdf5_resume_with_shuffle(h5_files):
    source, _ = h5_files
    layer, top = hdf5_layer(source, batch=2, shuffle=True, seed=5)
    for _ in range(3):
        forward_tops(layer, top)
    state, rng_state = layer.get_state(), layer.rng.bit_generator.state
    assert set(state) == {"file", "cursor", "epoch", "file_order", "order"}
    expected = [forward_tops(layer, top)[1] for _ in range(6)]
    resumed, top2 = hdf5_layer(source, batch=2, shuffle=True, seed=77)
    resumed.set_state(state)
    resumed.rng.bit_generator.state = rng_state
    for want in expected:
        np.testing.assert_array_equal(forward_tops(resumed, top2)[1], want)


def test_hdf5_errors(h5_files, tmp_path):
    source, _ = h5_files
    with pytest.raises(LayerError, match="does not transform"):
        hdf5_layer(source, extra="transform_param { scale: 2 }")
    with pytest.raises(DataError, match="cannot read the HDF5 list file"):
        hdf5_layer(tmp_path / "nolist.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="names no files"):
        hdf5_layer(tmp_path / "empty.txt")
    (tmp_path / "ghost.txt").write_text("ghost.h5\n")
    with pytest.raises(DataError, match=r"'ghost.h5'.*does not exist"):
        hdf5_layer(tmp_path / "ghost.txt")
    write_h5(tmp_path / "nolabel.h5", data=np.zeros((2, 1)))
    (tmp_path / "nolabel.txt").write_text(str(tmp_path / "nolabel.h5"))
    with pytest.raises(DataError, match="no dataset 'label' \\(found: data\\)"):
        hdf5_layer(tmp_path / "nolabel.txt")
    write_h5(tmp_path / "ragged.h5", data=np.zeros((2, 1)), label=np.zeros(3))
    (tmp_path / "ragged.txt").write_text(str(tmp_path / "ragged.h5"))
    with pytest.raises(DataError, match="different row counts"):
        hdf5_layer(tmp_path / "ragged.txt")


# -- MemoryData ----------------------------------------------------------------------------------
def memory_layer(extra="", batch=2, dtype=np.float64):
    text = (f'type: "MemoryData" memory_data_param {{ batch_size: {batch} channels: 2 height: 3 '
            f'width: 1 }} {extra}')
    return make_layer(text, [], n_top=2, dtype=dtype)


def test_memory_data_batches_and_wrap():
    layer, top = memory_layer()
    assert top[0].shape == (2, 2, 3, 1) and top[1].shape == (2,)
    data = RNG.normal(size=(6, 2, 3, 1)).astype(np.float32)
    layer.set_input_arrays(data, np.arange(6.0))
    served = [forward_tops(layer, top) for _ in range(4)]
    rows = [0, 1, 2, 3, 4, 5, 0, 1]
    np.testing.assert_array_equal(np.concatenate([d for d, _ in served]), data[rows])
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in served]), rows)
    assert layer.get_state() == {"cursor": 2}
    layer.set_state({"cursor": 4})
    np.testing.assert_array_equal(forward_tops(layer, top)[1], [4, 5])


def test_memory_data_reset_does_not_transform(caplog):
    layer, top = memory_layer("transform_param { scale: 2 }")
    data = np.ones((2, 2, 3, 1), np.float32)
    with caplog.at_level(logging.WARNING):
        layer.reset(data, np.zeros((2, 1, 1, 1)))
    assert "does not transform" in caplog.text
    np.testing.assert_array_equal(forward_tops(layer, top)[0], data)


def test_memory_data_add_datum_and_mat_vectors_transform():
    layer, top = memory_layer("transform_param { scale: 0.5 mean_value: 1 }")
    images = RNG.integers(0, 256, (4, 2, 3, 1), dtype=np.uint8)
    layer.add_datum_vector([array_to_datum(im, i) for i, im in enumerate(images)])
    data, label = forward_tops(layer, top)
    np.testing.assert_array_equal(data, (images[:2] - 1.0) * 0.5)
    np.testing.assert_array_equal(label, [0, 1])
    layer.add_mat_vector([im.transpose(1, 2, 0) for im in images[2:]], [7, 8])
    data, label = forward_tops(layer, top)
    np.testing.assert_array_equal(data, (images[2:] - 1.0) * 0.5)
    np.testing.assert_array_equal(label, [7, 8])


@pytest.mark.parametrize("data_shape, labels, match", [
    ((3, 2, 3, 1), np.zeros(3), "multiple of batch_size 2"),
    ((2, 2, 3, 2), np.zeros(2), r"must be \(N, 2, 3, 1\)"),
    ((2, 6), np.zeros(2), r"must be \(N, 2, 3, 1\)"),
    ((4, 2, 3, 1), np.zeros(3), "one value per data row"),
])
def test_memory_data_reset_errors(data_shape, labels, match):
    layer, _ = memory_layer()
    with pytest.raises(LayerError, match=match):
        layer.reset(np.zeros(data_shape, np.float32), labels)


def test_memory_data_setup_and_forward_errors():
    with pytest.raises(LayerError, match="must all be positive"):
        make_layer('type: "MemoryData" memory_data_param { batch_size: 2 channels: 1 }', [],
                   n_top=2)
    layer, top = memory_layer()
    with pytest.raises(DataError, match="call reset"):
        forward_tops(layer, top)


def test_memory_data_in_float32():
    layer, top = memory_layer(dtype=np.float32)
    layer.reset(np.arange(12.0).reshape(2, 2, 3, 1), [3, 4])
    data, label = forward_tops(layer, top)
    assert data.dtype == np.float32 and top[0].data.dtype == np.float32
    np.testing.assert_array_equal(label, [3, 4])


def test_blob_counts():
    from layer_helpers import layer_param

    from engine.layer import LAYERS

    assert LAYERS["Data"].n_top == (1, 2) and LAYERS["Data"].n_bottom == (0, 0)
    assert LAYERS["MemoryData"].n_top == (2, 2)
    layer = LAYERS["Input"](layer_param('type: "Input"'))
    with pytest.raises(LayerError, match="takes 0 bottom"):
        layer.check_blob_counts([Blob()], [Blob()])
