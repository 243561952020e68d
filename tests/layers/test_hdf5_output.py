"""HDF5Output: Caffe's datasets and legacy 4-d shapes, appended batches, a net that dumps its
data, gradients and errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from layer_helpers import make_layer, random_blob

from engine.errors import LayerError
from engine.net import Net


def text(path) -> str:
    return f'type: "HDF5Output" hdf5_output_param {{ file_name: "{path}" }}'


def test_hdf5_output_writes_caffes_layout_and_appends(tmp_path):
    path = tmp_path / "out.h5"
    data, label = random_blob((3, 5), seed=1), random_blob((3,), seed=2)
    layer, top = make_layer(text(path), [data, label], n_top=0)
    assert top == [] and path.is_file()  # created at setup, as Caffe's H5Fcreate
    layer.forward([data, label], top)
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["data", "label"]
        assert f["data"].shape == (3, 5, 1, 1) and f["label"].shape == (3, 1, 1, 1)
        assert f["data"].dtype == np.float64
        np.testing.assert_array_equal(f["data"][()].reshape(3, 5), data.data)
    first = data.data.copy()
    data.data[...] += 1
    layer.reshape([data, label], top)
    layer.forward([data, label], top)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][()].reshape(6, 5), np.vstack([first, data.data]))
        np.testing.assert_array_equal(f["label"][()].ravel(), np.tile(label.data, 2))


def test_hdf5_output_in_a_net_dumps_every_batch(tmp_path):
    path = tmp_path / "dump.h5"
    net = Net(f"""
        layer {{ name: "in" type: "DummyData" top: "x" top: "y"
          dummy_data_param {{ shape {{ dim: 2 dim: 3 dim: 4 }} shape {{ dim: 2 }}
                             data_filler {{ type: "gaussian" }} }} }}
        layer {{ name: "out" type: "HDF5Output" bottom: "x" bottom: "y"
          hdf5_output_param {{ file_name: "{path}" }} }}""", rng=np.random.default_rng(0))
    batches = []
    for _ in range(3):
        net.forward()
        batches.append(net.blobs["x"].data.copy())
    with h5py.File(path, "r") as f:
        assert f["data"].shape == (6, 3, 4, 1) and f["data"].dtype == np.float32
        np.testing.assert_array_equal(f["data"][()][..., 0], np.concatenate(batches))


def test_hdf5_output_backward_writes_zero_diffs(tmp_path):
    data, label = random_blob((2, 2), seed=1), random_blob((2,), seed=2)
    layer, top = make_layer(text(tmp_path / "o.h5"), [data, label], n_top=0)
    data.diff[...] = 5
    label.diff[...] = 5
    layer.backward(top, [True, False], [data, label])
    assert np.all(data.diff == 0) and np.all(label.diff == 5)


def test_hdf5_output_errors(tmp_path):
    data, label = random_blob((3, 2), seed=1), random_blob((2,), seed=2)
    with pytest.raises(LayerError, match="same batch size"):
        make_layer(text(tmp_path / "o.h5"), [data, label], n_top=0)
    with pytest.raises(LayerError, match=r"5 axes .*at most 4"):
        make_layer(text(tmp_path / "o.h5"), [random_blob((1, 1, 1, 1, 2)), random_blob((1,))],
                   n_top=0)
    with pytest.raises(LayerError, match="file_name is empty"):
        make_layer('type: "HDF5Output"', [data, random_blob((3,))], n_top=0)
    with pytest.raises(LayerError, match="cannot create HDF5 file"):
        make_layer(text(tmp_path / "no" / "dir" / "o.h5"), [data, random_blob((3,))], n_top=0)
    layer, top = make_layer(text(tmp_path / "o.h5"), [data, random_blob((3,))], n_top=0)
    layer.forward([data, random_blob((3,))], top)
    wider = random_blob((3, 4))
    layer.reshape([wider, random_blob((3,))], top)
    with pytest.raises(LayerError, match="each batch must keep the row shape"):
        layer.forward([wider, random_blob((3,))], top)
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert f["data"].shape[0] == f["label"].shape[0] == 3  # nothing half-written
