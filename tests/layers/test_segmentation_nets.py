"""Nets shaped like the published segmentation models: a SegNet encoder-decoder (Conv/BN/ReLU,
MAX Pooling with mask tops, Upsample by those masks, class-weighted SoftmaxWithLoss) and an
ENet/PSPNet-shaped net (BN INFERENCE, ReLU6, an SE block joined by Axpy, a pyramid-pooling
branch resized by Interp, an unpooling decoder). Each builds at batch 1 and 2, runs forward
and backward; SegNet's gradient matches finite differences and a few SGD steps lower its loss.
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import engine
from engine import caffe_pb2
from engine.net import Net


def conv(name, bottom, n, k=3, pad=1, stride=1):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} stride: {stride}'
            f' weight_filler {{ type: "msra" }} bias_filler {{ type: "constant" value: 0.1 }} }}'
            f' }}\n')


def conv_bn_relu(name, bottom, n):
    """SegNet's unit: Convolution, BN (LEARN, batch statistics), ReLU in place."""
    return conv(name, bottom, n) + (
        f'layer {{ name: "{name}_bn" type: "BN" bottom: "{name}" top: "{name}_bn" '
        f'bn_param {{ scale_filler {{ type: "constant" value: 1 }} '
        f'shift_filler {{ type: "constant" value: 0.001 }} }} }}\n'
        f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}_bn" top: "{name}_bn" }}\n')


def segnet(batch: int) -> str:
    text = (f'name: "segnet_small"\nlayer {{ name: "data" type: "Input" top: "data" '
            f'top: "label" input_param {{ shape {{ dim: {batch} dim: 3 dim: 15 dim: 16 }} '
            f'shape {{ dim: {batch} dim: 1 dim: 15 dim: 16 }} }} }}\n')
    text += conv_bn_relu("conv1", "data", 6)
    text += ('layer { name: "pool1" type: "Pooling" bottom: "conv1_bn" top: "pool1" '
             'top: "pool1_mask" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n')
    text += conv_bn_relu("conv2", "pool1", 8)
    text += ('layer { name: "pool2" type: "Pooling" bottom: "conv2_bn" top: "pool2" '
             'top: "pool2_mask" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n')
    text += ('layer { name: "upsample2" type: "Upsample" bottom: "pool2" bottom: "pool2_mask" '
             'top: "up2" upsample_param { scale: 2 } }\n')
    text += conv_bn_relu("conv2_D", "up2", 6)
    text += ('layer { name: "upsample1" type: "Upsample" bottom: "conv2_D_bn" '
             'bottom: "pool1_mask" top: "up1" upsample_param { upsample_h: 15 upsample_w: 16 } '
             '}\n')
    text += conv("conv1_D", "up1", 4)
    text += ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv1_D" bottom: "label" '
             'top: "loss" loss_param { ignore_label: 3 weight_by_label_freqs: true '
             'class_weighting: 0.8 class_weighting: 1.5 class_weighting: 1.0 '
             'class_weighting: 1.0 } }\n')
    return text


def build(text: str, phase=engine.TRAIN, dtype=np.float64, force_backward=False) -> Net:
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    param.force_backward = force_backward
    return Net(param, phase, rng=np.random.default_rng(0), dtype=dtype)


def fill_inputs(net: Net, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    net.blobs["data"].data[...] = rng.uniform(-1, 1, net.blobs["data"].shape)
    if "label" in net.blobs:
        net.blobs["label"].data[...] = rng.integers(0, 4, net.blobs["label"].shape)


@pytest.mark.parametrize("batch", [1, 2])
def test_segnet_builds_runs_forward_and_backward(batch):
    net = build(segnet(batch))
    fill_inputs(net)
    assert net.blobs["pool1_mask"].shape == (batch, 6, 8, 8)  # ceil: 15 rows give 8
    assert net.blobs["pool2_mask"].shape == (batch, 8, 4, 4)
    assert net.blobs["up2"].shape == (batch, 8, 8, 8)
    assert net.blobs["up1"].shape == (batch, 6, 15, 16)
    loss = net.forward_backward()
    assert np.isfinite(loss) and loss > 0
    for name in ("conv1", "conv1_bn", "conv2_D", "conv1_D"):
        diffs = [p.diff for p in net.params[name]]
        assert all(np.isfinite(d).all() for d in diffs)
        assert any(np.abs(d).sum() > 0 for d in diffs), name
    # the unpooled maps are zero away from the max positions their masks name
    up1 = net.blobs["up1"].data
    assert (up1 != 0).reshape(batch, 6, -1).sum(axis=2).max() <= 7 * 8


def test_segnet_gradient_matches_finite_differences():
    net = build(segnet(2))
    fill_inputs(net, seed=1)
    for blob in net.learnable_params:
        blob.diff[...] = 0
    net.forward_backward()
    rng = np.random.default_rng(2)
    for name, index in (("conv1", 0), ("conv1_bn", 0), ("conv2_bn", 1), ("conv2_D", 0),
                        ("conv1_D", 1)):
        blob = net.params[name][index]
        flat, grad = blob.data.reshape(-1), blob.diff.reshape(-1).copy()
        for j in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            original = flat[j]
            flat[j] = original + 1e-6
            plus = net.forward_from_to()
            flat[j] = original - 1e-6
            minus = net.forward_from_to()
            flat[j] = original
            numeric = (plus - minus) / 2e-6
            assert abs(numeric - grad[j]) <= 1e-4 * max(1.0, abs(numeric)), (name, j)


def test_segnet_sgd_steps_lower_the_loss():
    """Labels that depend on the input (the sign of two channels), so the net can learn them."""
    net = build(segnet(2))
    fill_inputs(net, seed=3)
    data = net.blobs["data"].data
    net.blobs["label"].data[:, 0] = (data[:, 0] > 0) + 2 * (data[:, 1] > 0)
    losses = []
    for _ in range(STEPS):
        for blob in net.learnable_params:
            blob.diff[...] = 0
        losses.append(net.forward_backward())
        for blob in net.learnable_params:
            blob.data[...] -= LR * blob.diff
    assert losses[-1] < 0.6 * losses[0]


STEPS, LR = 30, 0.5


def enet_pspnet(batch: int) -> str:
    """Initial block, SE unit with Axpy, pyramid pooling with Interp, unpooling decoder."""
    text = (f'name: "enet_psp_small"\nlayer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: {batch} dim: 3 dim: 24 dim: 24 }} }} }}\n')
    text += conv("conv0", "data", 8, stride=2)
    text += ('layer { name: "bn0" type: "BN" bottom: "conv0" top: "bn0" bn_param { '
             'scale_filler { type: "constant" value: 1 } shift_filler { type: "constant" '
             'value: 0.001 } bn_mode: INFERENCE } }\n'
             'layer { name: "relu0" type: "ReLU6" bottom: "bn0" top: "bn0" }\n'
             'layer { name: "pool0" type: "Pooling" bottom: "bn0" top: "pool0" top: "mask0" '
             'pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }\n')
    text += conv("conv1", "pool0", 8)
    # SE: global pooling, squeeze, excite, sigmoid, then Axpy(a, x, shortcut)
    text += ('layer { name: "se_pool" type: "Pooling" bottom: "conv1" top: "se_pool" '
             'pooling_param { pool: AVE global_pooling: true } }\n')
    text += conv("se_down", "se_pool", 2, k=1, pad=0)
    text += ('layer { name: "se_relu" type: "ReLU6" bottom: "se_down" top: "se_down" }\n')
    text += conv("se_up", "se_down", 8, k=1, pad=0)
    text += ('layer { name: "se_gate" type: "Sigmoid" bottom: "se_up" top: "se_gate" }\n'
             'layer { name: "axpy" type: "Axpy" bottom: "se_gate" bottom: "conv1" '
             'bottom: "pool0" top: "se_out" }\n')
    # pyramid pooling: pool to 2x2, 1x1 conv, Interp back to the feature size
    text += ('layer { name: "psp_pool" type: "Pooling" bottom: "se_out" top: "psp_pool" '
             'pooling_param { pool: AVE kernel_size: 3 stride: 3 } }\n')
    text += conv("psp_conv", "psp_pool", 4, k=1, pad=0)
    text += ('layer { name: "psp_interp" type: "Interp" bottom: "psp_conv" top: "psp_up" '
             'interp_param { height: 5 width: 5 } }\n'
             'layer { name: "concat" type: "Concat" bottom: "se_out" bottom: "psp_up" '
             'top: "psp" }\n')
    text += conv("fuse", "psp", 8)
    text += ('layer { name: "unpool" type: "Upsample" bottom: "fuse" bottom: "mask0" '
             'top: "unpool" upsample_param { upsample_h: 12 upsample_w: 12 } }\n')
    text += conv("classifier", "unpool", 5, k=1, pad=0)
    text += ('layer { name: "zoom" type: "Interp" bottom: "classifier" top: "zoom" '
             'interp_param { zoom_factor: 2 } }\n'
             'layer { name: "prob" type: "Softmax" bottom: "zoom" top: "prob" }\n')
    return text


@pytest.mark.parametrize("batch", [1, 2])
def test_enet_pspnet_shaped_net_runs(batch):
    net = build(enet_pspnet(batch), phase=engine.TEST, dtype=np.float32, force_backward=True)
    fill_inputs(net)
    assert net.blobs["pool0"].shape == (batch, 8, 5, 5)  # floor: ceil_mode false
    assert net.blobs["psp_pool"].shape == (batch, 8, 2, 2)
    assert net.blobs["psp_up"].shape == (batch, 4, 5, 5)
    out = net.forward()
    prob = out["prob"]
    assert prob.shape == (batch, 5, 23, 23)
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    diffs = net.backward(prob=np.random.default_rng(1).standard_normal(prob.shape))
    assert np.isfinite(diffs["data"]).all() and np.abs(diffs["data"]).sum() > 0
    assert np.isfinite(net.params["bn0"][0].diff).all()


IN_PLACE_CHAIN = """
name: "chain"
layer { name: "in" type: "Input" top: "x" top: "a" top: "z" top: "t"
        input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } shape { dim: 2 dim: 3 }
                      shape { dim: 2 dim: 3 dim: 2 dim: 2 } shape { dim: 2 dim: 2 } } }
layer { name: "bn" type: "BN" bottom: "x" top: "x"
        bn_param { scale_filler { type: "uniform" min: 2 max: 3 }
                   shift_filler { type: "constant" value: 4 } } }
layer { name: "relu6" type: "ReLU6" bottom: "x" top: "x" }
layer { name: "power" type: "Power" bottom: "x" top: "x" power_param { scale: 2 shift: 0.5 } }
layer { name: "axpy" type: "Axpy" bottom: "a" bottom: "z" bottom: "x" top: "se" }
layer { name: "sigmoid" type: "Sigmoid" bottom: "se" top: "se" }
layer { name: "interp" type: "Interp" bottom: "se" top: "big" interp_param { zoom_factor: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "big" top: "y"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def test_in_place_chain_through_bn_and_relu6_has_the_true_gradient():
    """BN, ReLU6 and Power in place on one blob: ReLU6's backward reads its own output, which
    Power overwrites, so the Net must keep a copy; BN keeps its own. Every input and parameter
    diff of the net matches central differences."""
    net = build(IN_PLACE_CHAIN, force_backward=True)
    rng = np.random.default_rng(4)
    inputs = {name: rng.uniform(-1, 1, net.blobs[name].shape) for name in ("x", "a", "z", "t")}

    def loss() -> float:
        for name, array in inputs.items():
            net.blobs[name].data[...] = array  # the chain overwrote x
        return net.forward_from_to()

    for blob in net.learnable_params:
        blob.diff[...] = 0
    loss()
    net._seed_loss_diffs()
    net.backward_from_to()
    targets = [(name, inputs[name], net.blobs[name].diff.copy()) for name in ("x", "a", "z")]
    targets += [(name, blob.data, blob.diff.copy()) for name, blob in
                zip(net.learnable_param_names, net.learnable_params, strict=True)]
    for name, values, analytic in targets:
        flat = values.reshape(-1)
        for k in range(flat.size):
            original = flat[k]
            flat[k] = original + 1e-6
            plus = loss()
            flat[k] = original - 1e-6
            minus = loss()
            flat[k] = original
            numeric = (plus - minus) / 2e-6
            assert abs(numeric - analytic.reshape(-1)[k]) <= 1e-5 * max(1, abs(numeric)), \
                (name, k, numeric, analytic.reshape(-1)[k])
    assert net.in_place_copies == [("relu6", "x", "power")]
    assert (net.blobs["x"].data == 12.5).any()  # some were clipped at 6 (Power: 6 -> 12.5)
    assert (net.blobs["x"].data == 0.5).any()  # and some at 0


def write_pairs(folder, n: int = 5) -> str:
    """``n`` 15x16 PNG images with label images (classes 0-3) and their list file."""
    from PIL import Image

    rng = np.random.default_rng(11)
    lines = []
    for i in range(n):
        rgb = rng.integers(0, 256, (15, 16, 3), dtype=np.uint8)
        label = (rgb[..., 0] > 127) + 2 * (rgb[..., 1] > 127)
        Image.fromarray(rgb, "RGB").save(folder / f"im{i}.png")
        Image.fromarray(label.astype(np.uint8), "L").save(folder / f"lab{i}.png")
        lines.append(f"im{i}.png lab{i}.png\n")
    (folder / "train.txt").write_text("".join(lines))
    return str(folder / "train.txt")


def segnet_training_files(tmp_path, name: str, snapshot: int) -> str:
    source = write_pairs(tmp_path)
    data = (f'layer {{ name: "data" type: "DenseImageData" top: "data" top: "label" '
            f'transform_param {{ scale: 0.0078125 mean_value: 128 }} '
            f'dense_image_data_param {{ source: "{source}" root_folder: "{tmp_path}/" '
            f'batch_size: 2 shuffle: true mirror: true crop_height: 12 crop_width: 16 }} }}\n')
    net = segnet(2).split("\n", 2)[2]  # SegNet without its Input layer
    net = net.replace("upsample_h: 15 upsample_w: 16", "upsample_h: 12 upsample_w: 16")
    (tmp_path / "net.prototxt").write_text('name: "segnet_train"\n' + data + net)
    solver = tmp_path / f"{name}_solver.prototxt"
    solver.write_text(f'net: "{tmp_path}/net.prototxt" base_lr: 0.2 lr_policy: "fixed" '
                      f'momentum: 0.9 max_iter: 6 display: 0 random_seed: 5 '
                      f'snapshot: {snapshot} snapshot_prefix: "{tmp_path}/{name}"\n')
    return str(solver)


def test_segnet_trains_from_dense_image_data_and_resumes_bit_exactly(tmp_path):
    """DenseImageData (shuffle, shared mirror and crop) feeding SegNet through the solver:
    6 iterations straight equal 3, a snapshot, a restore and 3 more, bit for bit."""
    from solvers import get_solver

    def run(name: str, snapshot: int = 0, restore: str | None = None, steps: int = 6):
        solver = get_solver(segnet_training_files(tmp_path, name, snapshot))
        losses: list[float] = []
        solver.add_callback(on_gradients_ready=lambda: losses.append(
            float(solver.net.blobs["loss"].data)))
        if restore:
            solver.restore(restore)
        solver.step(steps)
        return solver, losses

    straight, straight_losses = run("straight")
    _, first_losses = run("first", snapshot=3, steps=3)
    resumed, resumed_losses = run("resumed", restore=str(tmp_path / "first_iter_3.solverstate"),
                                  steps=3)
    assert first_losses + resumed_losses == straight_losses
    for a, b in zip(straight.net.learnable_params, resumed.net.learnable_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    assert all(np.isfinite(straight_losses))
