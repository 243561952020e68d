"""The Net, Blob and layer surface as pycaffe code uses it (``import engine as caffe``)."""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import pytest

import engine as caffe

NET = """name: 'testnet' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { num: 5 channels: 2 height: 3 width: 4
    num: 5 channels: 1 height: 1 width: 1
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 11 kernel_size: 2 pad: 3
    weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'constant' value: 2 } }
  param { decay_mult: 1 } param { decay_mult: 0 } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
  inner_product_param { num_output: 13 weight_filler { type: 'gaussian' std: 2.5 }
    bias_filler { type: 'constant' value: -3 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label' top: 'loss' }
"""

DEPLOY = """name: 'deploy' force_backward: true
layer { type: 'Input' name: 'data' top: 'data' input_param { shape { dim: 4 dim: 3 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 1 } } }
layer { type: 'Sigmoid' name: 'prob' bottom: 'ip' top: 'prob' }
"""


@pytest.fixture
def net_file(tmp_path) -> str:
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return str(path)


@pytest.fixture
def net(net_file) -> caffe.Net:
    caffe.set_random_seed(3)
    net = caffe.Net(net_file, caffe.TRAIN)
    net.blobs["label"].data[...] = (np.arange(5) % 13).reshape(5, 1, 1, 1)
    return net


@pytest.fixture
def deploy(tmp_path) -> caffe.Net:
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY)
    caffe.set_random_seed(5)
    return caffe.Net(str(path), caffe.TEST)


# -- names --------------------------------------------------------------------------------------
def test_names_in_pycaffe_shapes(net):
    assert net._layer_names == ["data", "conv", "ip", "loss"]
    assert net._blob_names == ["data", "label", "conv", "ip_blob", "loss"]
    assert net.top_names == OrderedDict([("data", ["data", "label"]), ("conv", ["conv"]),
                                         ("ip", ["ip_blob"]), ("loss", ["loss"])])
    assert net.bottom_names == OrderedDict([("data", []), ("conv", ["data"]),
                                            ("ip", ["conv"]), ("loss", ["ip_blob", "label"])])
    assert net.inputs == []
    assert net.outputs == ["loss"]
    assert net._outputs == [4]
    assert net._top_ids(0) == [0, 1]
    assert net._bottom_ids(3) == [3, 1]
    assert net._blob_loss_weights == [0, 0, 0, 0, 1]
    assert net.blob_loss_weights["loss"] == 1
    assert list(net.layer_dict) == net._layer_names
    assert [blob.shape for blob in net._blobs] == [b.shape for b in net.blobs.values()]


def test_params_are_lists_of_blobs_by_layer(net):
    assert list(net.params) == ["conv", "ip"]
    weights, bias = net.params["conv"]
    assert weights.shape == (11, 2, 2, 2)
    assert (weights.num, weights.channels, weights.height, weights.width) == (11, 2, 2, 2)
    assert weights.count == 88
    np.testing.assert_array_equal(bias.data, 2)
    assert net.layers[1].blobs[0] is weights
    assert net.layer_dict["ip"].type == "InnerProduct"


def test_blob_reshape_takes_dims_as_arguments(deploy):
    blob = deploy.blobs["data"]
    blob.reshape(7, 3)
    deploy.reshape()
    assert deploy.blobs["prob"].shape == (7, 2)
    assert (blob.num, blob.channels, blob.height, blob.width) == (7, 3, 1, 1)


def test_layers_set_up_and_reshape_like_pycaffe(deploy):
    layer = deploy.layer_dict["prob"]
    bottom, top = [deploy.blobs["ip"]], [deploy.blobs["prob"]]
    deploy.blobs["ip"].reshape(6, 2)
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    assert top[0].shape == (6, 2)


# -- constructors ---------------------------------------------------------------------------------
def test_every_constructor_form(net, net_file, tmp_path):
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    nets = [caffe.Net(net_file, weights, caffe.TRAIN),           # the deprecated form
            caffe.Net(net_file, caffe.TRAIN, weights=weights),
            caffe.Net(network_file=net_file, phase=caffe.TRAIN, weights=weights),
            caffe.Net(net_file, caffe.TEST, level=0, stages=None, weights=weights)]
    for other in nets:
        for name, blobs in net.params.items():
            for mine, theirs in zip(blobs, other.params[name], strict=True):
                np.testing.assert_array_equal(mine.data, theirs.data)


def test_save_hdf5_and_load_hdf5(net, net_file, tmp_path):
    path = str(tmp_path / "w.h5")
    net.save_hdf5(path)
    other = caffe.Net(net_file, caffe.TRAIN)
    other.load_hdf5(path)
    for name in net.params:
        for mine, theirs in zip(net.params[name], other.params[name], strict=True):
            np.testing.assert_array_equal(mine.data, theirs.data)


def test_copy_from_and_share_with(net, net_file, tmp_path):
    path = str(tmp_path / "w.caffemodel")
    net.save(path)
    other = caffe.Net(net_file, caffe.TEST)
    other.copy_from(path)
    np.testing.assert_array_equal(other.params["ip"][0].data, net.params["ip"][0].data)
    third = caffe.Net(net_file, caffe.TEST)
    third.share_with(net)
    net.params["ip"][0].data[...] = 0.5
    np.testing.assert_array_equal(third.params["ip"][0].data, 0.5)


# -- running --------------------------------------------------------------------------------------
def test_forward_start_end_returns_the_end_layers_tops(net):
    net.forward()
    sample = np.random.default_rng(0).random(net.blobs["conv"].shape, dtype=np.float32)
    net.blobs["conv"].data[...] = sample
    out = net.forward(start="ip", end="ip")
    assert set(out) == {"ip_blob"}
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    np.testing.assert_allclose(out["ip_blob"], sample.reshape(5, -1) @ w.T + b, rtol=1e-4,
                               atol=1e-4)


def test_backward_start_end_returns_the_end_layers_bottoms(net):
    net.forward()
    top_diff = np.random.default_rng(1).random(net.blobs["ip_blob"].shape, dtype=np.float32)
    net.blobs["ip_blob"].diff[...] = top_diff
    out = net.backward(start="ip", end="ip")
    assert set(out) == {"conv"}
    expected = (top_diff @ net.params["ip"][0].data).reshape(net.blobs["conv"].shape)
    np.testing.assert_allclose(out["conv"], expected, rtol=1e-4, atol=1e-5)


def test_index_forms_match_named_forms(net):
    loss = net._forward(0, len(net.layers) - 1)
    assert loss == pytest.approx(float(net.blobs["loss"].data))
    net.clear_param_diffs()
    net._backward(len(net.layers) - 1, 0)
    assert np.abs(net.params["conv"][0].diff).max() > 0
    net.clear_param_diffs()
    assert not net.params["conv"][0].diff.any()


def test_forward_all_pads_the_last_batch_and_drops_it(deploy, rng):
    data = rng.random((10, 3)).astype(np.float32)
    out = deploy.forward_all(data=data)
    assert out["prob"].shape == (10, 2)
    w = deploy.params["ip"][0].data
    np.testing.assert_allclose(out["prob"], 1 / (1 + np.exp(-(data @ w.T + deploy.params["ip"][1]
                                                                .data))), rtol=1e-5)


def test_forward_backward_all(deploy, rng):
    data = rng.random((6, 3)).astype(np.float32)
    diffs = rng.random((6, 2)).astype(np.float32)
    outs, grads = deploy.forward_backward_all(data=data, prob=diffs)
    assert outs["prob"].shape == (6, 2)
    assert grads["data"].shape == (6, 3)
    p = outs["prob"]
    expected = (diffs * p * (1 - p)) @ deploy.params["ip"][0].data
    np.testing.assert_allclose(grads["data"], expected, rtol=1e-4, atol=1e-6)


def test_set_input_arrays_feeds_memory_data(tmp_path, rng):
    path = tmp_path / "memory.prototxt"
    path.write_text("layer { type: 'MemoryData' name: 'm' top: 'data' top: 'label' "
                    "memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }")
    net = caffe.Net(str(path), caffe.TEST)
    data = rng.random((4, 1, 2, 2)).astype(np.float32)
    net.set_input_arrays(data, np.arange(4, dtype=np.float32))
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[:2])
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data.ravel(), [2, 3])


# -- module level ---------------------------------------------------------------------------------
def test_module_switches(caplog, net_file):
    with caplog.at_level(logging.WARNING):
        caffe.set_mode_gpu()
        caffe.set_device(0)
    assert sum("CPU" in r.getMessage() for r in caplog.records) == 2
    caffe.set_mode_cpu()
    assert {"Data", "Convolution", "InnerProduct"} <= set(caffe.layer_type_list())
    caffe.set_random_seed(11)
    first = caffe.Net(net_file, caffe.TRAIN).params["conv"][0].data.copy()
    caffe.set_random_seed(11)
    np.testing.assert_array_equal(caffe.Net(net_file, caffe.TRAIN).params["conv"][0].data, first)
    assert (caffe.TRAIN, caffe.TEST) == (0, 1)
    assert issubclass(caffe.Layer, object)


def test_per_layer_callbacks_as_train_py_uses_them(net):
    events = []
    net.before_forward(lambda i: events.append(("f+", i)))
    net.after_forward(lambda i: events.append(("f-", i)))
    net.before_backward(lambda i: events.append(("b+", i)))
    net.after_backward(lambda i: events.append(("b-", i)))
    net.forward()
    net.backward()
    forward = [e for i in range(4) for e in (("f+", i), ("f-", i))]
    backward = [e for i in reversed(range(4)) for e in (("b+", i), ("b-", i))]
    assert events == forward + backward


def test_timer_and_cpu_build_multi_gpu_names(tmp_path):
    timer = caffe.Timer()
    assert timer.ms == 0.0  # never run
    timer.start()
    sum(range(10000))
    timer.stop()
    assert timer.ms > 0
    assert caffe.has_nccl() is False
    caffe.set_solver_count(1)
    caffe.set_solver_rank(0)
    caffe.set_multiprocess(False)
    assert (caffe.solver_count(), caffe.solver_rank()) == (1, 0)
    caffe.log("a line from pycaffe code")
