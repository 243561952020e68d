"""Nets shaped like the public architectures that use the forks' layers, at small width and
resolution: MobileNet v1 (depthwise convolutions), ShuffleNet v2 units (ShuffleChannel, Slice,
Concat, depthwise) and an SSD head on a small backbone (Normalize, Permute, Flatten, PriorBox,
Concat, Reshape, Softmax, DetectionOutput). Each builds at batch 1-2 and runs forward; Moka
saves random weights and OpenCV's Caffe reader (``cv2.dnn.readNetFromCaffe``) computes the
same blobs from the prototxt and the caffemodel, to 1e-4.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import engine


# -- prototxt builders ---------------------------------------------------------------------------
def conv(name: str, bottom: str, out: int, kernel: int = 1, stride: int = 1, pad: int = 0,
         kind: str = "Convolution", group: int = 1, bias: bool = False) -> str:
    extra = f" group: {group}" if group > 1 else ""
    return (f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{name}" '
            f"convolution_param {{ num_output: {out} kernel_size: {kernel} stride: {stride} "
            f"pad: {pad}{extra} bias_term: {str(bias).lower()} }} }}\n")


def bn_relu(name: str, relu: bool = True) -> str:
    """Caffe's BatchNorm (global stats) + Scale in place, then ReLU: MobileNet-Caffe's idiom."""
    text = (f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{name}" top: "{name}" '
            f"batch_norm_param {{ use_global_stats: true }} }}\n"
            f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{name}" top: "{name}" '
            f"scale_param {{ bias_term: true }} }}\n")
    if relu:
        text += f'layer {{ name: "{name}/relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


def input_layer(shape: tuple[int, ...]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f"input_param {{ shape {{ {dims} }} }} }}\n")


def classifier(bottom: str, classes: int) -> str:
    return (f'layer {{ name: "pool" type: "Pooling" bottom: "{bottom}" top: "pool" '
            f"pooling_param {{ pool: AVE global_pooling: true }} }}\n"
            + conv("fc", "pool", classes, bias=True)
            + 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')


def mobilenet_v1(batch: int = 2, size: int = 64) -> str:
    """MobileNet v1 at width 1/4: conv 3x3/2, then depthwise 3x3 + pointwise 1x1 pairs (both
    MobileNet ports' depthwise types), global pooling, a 1x1 classifier."""
    text = 'name: "MobileNet_v1_quarter"\n' + input_layer((batch, 3, size, size))
    text += conv("conv1", "data", 8, 3, 2, 1) + bn_relu("conv1")
    # (output channels, stride) of MobileNet v1's blocks, width 1/4, the 512-wide run cut short
    blocks = [(16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2),
              (256, 1)]
    bottom, channels = "conv1", 8
    for i, (out, stride) in enumerate(blocks, 2):
        kind = "ConvolutionDepthwise" if i % 2 else "DepthwiseConvolution"
        dw, pw = f"conv{i}_dw", f"conv{i}_pw"
        text += conv(dw, bottom, channels, 3, stride, 1, kind, group=channels) + bn_relu(dw)
        text += conv(pw, dw, out) + bn_relu(pw)
        bottom, channels = pw, out
    return text + classifier(bottom, 10)


def shuffle_unit(name: str, bottom: str, channels: int, stride: int) -> str:
    """A ShuffleNet v2 unit: split (or duplicate when downsampling), a 1x1 / depthwise 3x3 /
    1x1 branch, concat, channel shuffle with group 2."""
    half = channels // 2
    text = ""
    if stride == 1:
        text += (f'layer {{ name: "{name}/split" type: "Slice" bottom: "{bottom}" '
                 f'top: "{name}/left" top: "{name}/right" slice_param {{ axis: 1 '
                 f"slice_point: {half} }} }}\n")
        left, right, out_half = f"{name}/left", f"{name}/right", half
    else:
        out_half = channels
        text += conv(f"{name}/l_dw", bottom, channels, 3, 2, 1, "ConvolutionDepthwise",
                     group=channels) + bn_relu(f"{name}/l_dw", relu=False)
        text += conv(f"{name}/l_pw", f"{name}/l_dw", out_half) + bn_relu(f"{name}/l_pw")
        left, right = f"{name}/l_pw", bottom
    text += conv(f"{name}/r_pw1", right, out_half) + bn_relu(f"{name}/r_pw1")
    text += conv(f"{name}/r_dw", f"{name}/r_pw1", out_half, 3, stride, 1,
                 "ConvolutionDepthwise", group=out_half) + bn_relu(f"{name}/r_dw", relu=False)
    text += conv(f"{name}/r_pw2", f"{name}/r_dw", out_half) + bn_relu(f"{name}/r_pw2")
    text += (f'layer {{ name: "{name}/concat" type: "Concat" bottom: "{left}" '
             f'bottom: "{name}/r_pw2" top: "{name}/concat" }}\n'
             f'layer {{ name: "{name}/shuffle" type: "ShuffleChannel" bottom: "{name}/concat" '
             f'top: "{name}/shuffle" shuffle_channel_param {{ group: 2 }} }}\n')
    return text


def shufflenet_v2(batch: int = 2, size: int = 32) -> str:
    text = 'name: "ShuffleNet_v2_units"\n' + input_layer((batch, 3, size, size))
    text += conv("conv1", "data", 12, 3, 2, 1) + bn_relu("conv1")
    text += shuffle_unit("stage2_1", "conv1", 12, 2)          # 12 -> 24 channels, 8x8
    text += shuffle_unit("stage2_2", "stage2_1/shuffle", 24, 1)
    text += shuffle_unit("stage3_1", "stage2_2/shuffle", 24, 2)  # 24 -> 48 channels, 4x4
    text += shuffle_unit("stage3_2", "stage3_1/shuffle", 48, 1)
    return text + classifier("stage3_2/shuffle", 10)


# (feature map, prior_box_param, priors per cell) for the SSD head's three sources
SSD_SOURCES = [
    ("conv3_norm", "min_size: 10 max_size: 22 aspect_ratio: 2 flip: true clip: false "
                   "step: 8 offset: 0.5", 4),
    ("conv4", "min_size: 22 max_size: 38 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: true",
     6),
    ("conv5", "min_size: 38 aspect_ratio: 2 flip: false clip: false img_size: 64 step: 32 "
              "offset: 0.25", 2),
]


def ssd_head(batch: int = 2, size: int = 64, classes: int = 4, code: str = "CENTER_SIZE",
             share: bool = True, shared_scale: bool = False) -> str:
    """SSD300's head at 64x64 on a 5-convolution backbone: the first source L2-normalised
    with a learned per-channel scale (conv4_3_norm), each source's loc/conf convolutions
    permuted to NHWC and flattened, PriorBox per source, all concatenated, softmax over the
    classes, DetectionOutput."""
    text = 'name: "SSD_small"\n' + input_layer((batch, 3, size, size))
    bottom = "data"
    for i, (out, stride) in enumerate([(16, 2), (32, 2), (32, 1), (48, 2), (48, 2)], 1):
        text += conv(f"conv{i}", bottom, out, 3, stride, 1, bias=True)
        text += (f'layer {{ name: "relu{i}" type: "ReLU" bottom: "conv{i}" top: "conv{i}" }}\n')
        bottom = f"conv{i}"
    text += ('layer { name: "conv3_norm" type: "Normalize" bottom: "conv3" top: "conv3_norm" '
             'norm_param { across_spatial: false channel_shared: '
             f'{str(shared_scale).lower()} '
             'scale_filler { type: "constant" value: 20 } } }\n')
    n_loc = 1 if share else classes
    locs, confs, priors = [], [], []
    for source, prior_param, per_cell in SSD_SOURCES:
        for what, width in (("loc", per_cell * 4 * n_loc), ("conf", per_cell * classes)):
            name = f"{source}_mbox_{what}"
            text += conv(name, source, width, 3, 1, 1, bias=True)
            text += (f'layer {{ name: "{name}_perm" type: "Permute" bottom: "{name}" '
                     f'top: "{name}_perm" permute_param {{ order: 0 order: 2 order: 3 '
                     f"order: 1 }} }}\n"
                     f'layer {{ name: "{name}_flat" type: "Flatten" bottom: "{name}_perm" '
                     f'top: "{name}_flat" flatten_param {{ axis: 1 }} }}\n')
            (locs if what == "loc" else confs).append(f"{name}_flat")
        text += (f'layer {{ name: "{source}_mbox_priorbox" type: "PriorBox" bottom: "{source}" '
                 f'bottom: "data" top: "{source}_mbox_priorbox" prior_box_param {{ '
                 f"{prior_param} variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }} }}\n")
        priors.append(f"{source}_mbox_priorbox")
    for top, bottoms, axis in (("mbox_loc", locs, 1), ("mbox_conf", confs, 1),
                               ("mbox_priorbox", priors, 2)):
        joined = " ".join(f'bottom: "{b}"' for b in bottoms)
        text += (f'layer {{ name: "{top}" type: "Concat" {joined} top: "{top}" '
                 f"concat_param {{ axis: {axis} }} }}\n")
    text += f"""
layer {{ name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "mbox_conf_reshape"
        reshape_param {{ shape {{ dim: 0 dim: -1 dim: {classes} }} }} }}
layer {{ name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape"
        top: "mbox_conf_softmax" softmax_param {{ axis: 2 }} }}
layer {{ name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax"
        top: "mbox_conf_flatten" flatten_param {{ axis: 1 }} }}
layer {{ name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc"
        bottom: "mbox_conf_flatten" bottom: "mbox_priorbox" top: "detection_out"
        detection_output_param {{ num_classes: {classes} share_location: {str(share).lower()}
          background_label_id: 0 nms_param {{ nms_threshold: 0.45 top_k: 40 }}
          code_type: {code} keep_top_k: 30 confidence_threshold: 0.3 }} }}
"""
    return text


# -- running both ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless<5, the test "
                               "extra) is not installed: cannot check against its Caffe reader")


def randomize(net: engine.Net, seed: int) -> None:
    """Weights that keep activations near unit scale (SSD's loc and conf predictions smaller:
    boxes near their priors, class scores without ties); BatchNorm statistics that are not
    the identity (moving-average factor 1, positive variances)."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type == "BatchNorm":
            blobs[0].data[...] = rng.uniform(-0.2, 0.2, blobs[0].shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].shape)
            blobs[2].data[...] = 1
        elif layer.type == "Scale":
            blobs[0].data[...] = rng.uniform(0.8, 1.2, blobs[0].shape)
            blobs[1].data[...] = rng.uniform(-0.1, 0.1, blobs[1].shape)
        elif blobs and layer.type != "Normalize":
            fan_in = math.prod(blobs[0].shape[1:])
            gain = 0.3 if "_mbox_" in layer.name else 1.0
            blobs[0].data[...] = gain * rng.standard_normal(blobs[0].shape) / math.sqrt(fan_in)
            for bias in blobs[1:]:
                bias.data[...] = rng.uniform(-0.1, 0.1, bias.shape)


def run_both(cv2, tmp_path: Path, text: str, seed: int, names: list[str]):
    """Moka's and OpenCV's values of blobs ``names`` for one random input batch."""
    prototxt, model = tmp_path / "deploy.prototxt", tmp_path / "weights.caffemodel"
    prototxt.write_text(text)
    net = engine.Net(str(prototxt), engine.TEST)
    randomize(net, seed)
    net.save(str(model))
    again = engine.Net(str(prototxt), engine.TEST, weights=str(model))  # Moka reads it back
    for name, blobs in net.params.items():
        for ours, read in zip(blobs, again.params[name], strict=True):
            np.testing.assert_array_equal(read.data, ours.data, err_msg=name)
    x = np.random.default_rng(seed + 1).uniform(-1, 1, net.blobs["data"].shape)
    x = x.astype(np.float32)
    net.forward(data=x)
    ours = [net.blobs[n].data.copy() for n in names]

    # OpenCV lacks the DepthwiseConvolution type; that fork's layer is Caffe's Convolution
    # (it adds only a GPU kernel), so OpenCV reads it as one.
    theirs_txt = tmp_path / "opencv.prototxt"
    theirs_txt.write_text(text.replace('"DepthwiseConvolution"', '"Convolution"'))
    reader = cv2.dnn.readNetFromCaffe(str(theirs_txt), str(model))
    reader.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    reader.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    reader.enableFusion(False)  # each layer's own output, comparable blob by blob
    reader.setInput(x, "data")
    # OpenCV names an output by the layer that wrote it: for a blob rewritten in place
    # (BatchNorm, Scale, ReLU), the last of them
    writers = {top: layer.name for layer in net.layers if layer.type != "Split"
               for top in net.top_names[layer.name]}
    theirs = reader.forward([writers[n] for n in names])
    return net, ours, theirs


def assert_close(ours: np.ndarray, theirs: np.ndarray, name: str) -> None:
    assert theirs.size == ours.size, name
    theirs = theirs.reshape(ours.shape)
    scale = max(1.0, float(np.abs(ours).max()))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_mobilenet_v1_matches_opencv(cv2, tmp_path):
    names = ["conv2_dw", "conv3_dw", "conv6_dw", "conv10_pw", "fc", "prob"]
    net, ours, theirs = run_both(cv2, tmp_path, mobilenet_v1(), 11, names)
    assert net.blobs["conv10_pw"].shape == (2, 256, 2, 2)
    assert {net.layer_dict[n].type for n in ("conv2_dw", "conv3_dw")} == {
        "DepthwiseConvolution", "ConvolutionDepthwise"}
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert_close(a, b, name)
    assert np.ptp(net.blobs["prob"].data) > 0.01  # the weights did something


def test_shufflenet_v2_units_match_opencv(cv2, tmp_path):
    names = ["stage2_1/concat", "stage2_1/shuffle", "stage2_2/shuffle", "stage3_2/shuffle",
             "prob"]
    net, ours, theirs = run_both(cv2, tmp_path, shufflenet_v2(), 12, names)
    assert net.blobs["stage3_2/shuffle"].shape == (2, 48, 4, 4)
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert_close(a, b, name)
    concat, shuffled = net.blobs["stage3_2/concat"].data, net.blobs["stage3_2/shuffle"].data
    np.testing.assert_array_equal(shuffled[:, 1::2], concat[:, 24:])  # the branch interleaved


@pytest.mark.parametrize(("code", "share", "shared_scale"), [
    # OpenCV 4 has no CORNER_SIZE (unit tests check it against the fork's loops)
    ("CENTER_SIZE", True, False), ("CORNER", False, False), ("CENTER_SIZE", False, True)])
def test_ssd_head_matches_opencv(cv2, tmp_path, code, share, shared_scale):
    names = ["conv3_norm", "conv3_norm_mbox_loc_perm", "mbox_loc", "mbox_conf_flatten",
             "mbox_priorbox", "detection_out"]
    net, ours, theirs = run_both(cv2, tmp_path, ssd_head(code=code, share=share,
                                                         shared_scale=shared_scale), 13, names)
    per_cell = sum(n * hw * hw for (_, _, n), hw in zip(SSD_SOURCES, (16, 8, 4), strict=True))
    assert net.blobs["mbox_priorbox"].shape == (1, 2, per_cell * 4)
    for name, a, b in zip(names[:-1], ours[:-1], theirs[:-1], strict=True):
        assert_close(a, b, name)
    detections, reference = ours[-1][0, 0], theirs[-1].reshape(-1, 7)
    assert 5 <= len(detections) <= 2 * 30  # keep_top_k per image
    assert set(detections[:, 0]) == {0, 1}  # both images found something
    # Rows as the fork writes them: per image, classes ascending, scores descending. OpenCV
    # writes the rows that survive keep_top_k in score order instead; the rows are the same.
    order = np.lexsort((-detections[:, 2], detections[:, 1], detections[:, 0]))
    np.testing.assert_array_equal(order, np.arange(len(detections)))
    reference = reference[np.lexsort((-reference[:, 2], reference[:, 1], reference[:, 0]))]
    np.testing.assert_allclose(reference, detections, rtol=1e-4, atol=1e-4)


def test_summary_counts_depthwise_layers_as_convolutions(tmp_path):
    from engine.summary import summarize

    prototxt = tmp_path / "mobilenet.prototxt"
    prototxt.write_text(mobilenet_v1(batch=1))
    s = summarize(str(prototxt))
    first, second = s.row("conv2_dw"), s.row("conv3_dw")  # 8, 16 channels on 32x32, 16x16
    assert (first.macs, second.macs) == (8 * 9 * 32 * 32, 16 * 9 * 16 * 16)
    assert (first.receptive_field, second.receptive_field) == ((7, 7), (11, 11))
