"""WindowData: the window file is sorted by the overlap thresholds, batches hold background then
foreground windows, and each warped window matches a reference written from Caffe's loops (with
OpenCV's own resize), for warp and square crops, context padding that leaves the image,
mirroring and both kinds of mean; errors name the file and what to fix."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from layer_helpers import make_layer

import engine
from engine.data.db import write_mean
from engine.errors import DataError, LayerError
from engine.io import read_net_param
from engine.net import Net

IMAGES = [(24, 32), (30, 20), (16, 16)]  # (height, width)
# (image, label, overlap, x1, y1, x2, y2)
WINDOWS = [
    (0, 1, 0.9, 4, 3, 20, 15),
    (0, 0, 0.1, 0, 0, 31, 23),     # the whole image
    (0, 2, 0.6, 10, 2, 14, 21),    # tall and thin
    (1, 3, 0.7, 0, 0, 9, 12),      # in the corner: context padding leaves the image
    (1, 0, 0.2, 5, 10, 19, 29),
    (1, 2, 0.4, 3, 3, 8, 8),       # between the thresholds: dropped
    (2, 0, 0.0, 2, 2, 13, 5),      # wide and flat
    (2, 1, 0.5, 8, 8, 15, 15),     # overlap == fg_threshold counts as foreground
]


@pytest.fixture
def window_file(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for index, (height, width) in enumerate(IMAGES):
        cv2.imwrite(str(tmp_path / f"im{index}.png"),
                    rng.integers(40, 256, (height, width, 3), dtype=np.uint8))
        mine = [w for w in WINDOWS if w[0] == index]
        lines += [f"# {index}", f"im{index}.png", f"3 {height} {width}", str(len(mine))]
        lines += [" ".join(str(v) for v in w[1:]) for w in mine]
    path = tmp_path / "windows.txt"
    path.write_text("\n".join(lines) + "\n")
    return tmp_path


def text(folder, crop_mode="warp", context_pad=0, extra="", transform="", batch=6):
    return (f'type: "WindowData" window_data_param {{ source: "{folder}/windows.txt" '
            f'root_folder: "{folder}/" batch_size: {batch} fg_threshold: 0.5 '
            f'bg_threshold: 0.3 fg_fraction: 0.5 context_pad: {context_pad} '
            f'crop_mode: "{crop_mode}" {extra} }} transform_param {{ crop_size: 10 {transform} }}')


def c_round(v) -> int:
    return int(np.sign(v) * np.floor(abs(v) + 0.5))


def reference_window(image, box, crop, context_pad, square, flip):
    """Caffe's WindowDataLayer::load_batch for one window, in float32, as HWC like cv::Mat;
    returns (warped patch, pad_h, pad_w)."""
    f = np.float32
    x1, y1, x2, y2 = box
    pad_w = pad_h = 0
    size = (crop, crop)  # (width, height), as cv::Size
    if context_pad > 0 or square:
        context_scale = f(crop) / f(crop - 2 * context_pad)
        half_height = f(y2 - y1 + 1) / f(2)
        half_width = f(x2 - x1 + 1) / f(2)
        center_x, center_y = f(x1) + half_width, f(y1) + half_height
        if square:
            half_width = half_height = max(half_height, half_width)
        x1 = c_round(center_x - half_width * context_scale)
        x2 = c_round(center_x + half_width * context_scale)
        y1 = c_round(center_y - half_height * context_scale)
        y2 = c_round(center_y + half_height * context_scale)
        unclipped_height, unclipped_width = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2 = max(0, x2 - image.shape[1] + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - max(0, y2 - image.shape[0]
                                                                           + 1)
        scale_x, scale_y = f(crop) / f(unclipped_width), f(crop) / f(unclipped_height)
        size = (c_round(f(x2 - x1 + 1) * scale_x), c_round(f(y2 - y1 + 1) * scale_y))
        pad_h = c_round(f(pad_y1) * scale_y)
        pad_w = c_round(f(pad_x2 if flip else pad_x1) * scale_x)
        size = (min(size[0], crop - pad_w), min(size[1], crop - pad_h))
    patch = cv2.resize(image[y1:y2 + 1, x1:x2 + 1], size, interpolation=cv2.INTER_LINEAR)
    if flip:
        patch = cv2.flip(patch, 1)
    return patch, pad_h, pad_w


def reference_batch(folder, seed, batch, crop, context_pad, square, mirror, mean, scale):
    """The whole batch, Caffe's order of draws and its per-pixel copy loop."""
    rng = np.random.default_rng(seed)
    fg = [w for w in WINDOWS if w[2] >= 0.5]
    bg = [w for w in WINDOWS if w[2] < 0.3]
    num_fg = int(np.float32(batch) * np.float32(0.5))
    data = np.zeros((batch, 3, crop, crop), np.float32)
    labels = []
    for item in range(batch):
        windows = bg if item < batch - num_fg else fg
        window = windows[int(rng.integers(0, 2**32)) % len(windows)]
        flip = mirror and int(rng.integers(0, 2**32)) % 2 == 1
        image = cv2.imread(str(folder / f"im{window[0]}.png"), cv2.IMREAD_COLOR)
        patch, pad_h, pad_w = reference_window(image, window[3:], crop, context_pad, square,
                                               flip)
        for h in range(patch.shape[0]):
            for w in range(patch.shape[1]):
                for c in range(3):
                    pixel = np.float32(patch[h, w, c])
                    m = mean[c, h + pad_h, w + pad_w] if mean is not None else 0
                    data[item, c, h + pad_h, w + pad_w] = (pixel - m) * np.float32(scale)
        labels.append(window[1] if windows is fg else 0)
    return data, np.array(labels, np.float32)


CASES = {
    "warp": dict(crop_mode="warp", context_pad=0, mirror=False, mean=None, scale=1.0),
    "context-mirror-mean-values": dict(crop_mode="warp", context_pad=2, mirror=True,
                                       mean="values", scale=0.5),
    "square-mean-file": dict(crop_mode="square", context_pad=3, mirror=True, mean="file",
                             scale=0.25),
    "square-no-context": dict(crop_mode="square", context_pad=0, mirror=False, mean=None,
                              scale=1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_window_data_matches_caffes_loops(window_file, case):
    c = CASES[case]
    transform, mean = f"mirror: {str(c['mirror']).lower()}", None
    if c["mean"] == "values":
        transform += " mean_value: 10 mean_value: 20 mean_value: 30"
        mean = np.broadcast_to(np.array([10, 20, 30], np.float32)[:, None, None], (3, 10, 10))
    elif c["mean"] == "file":
        full = np.random.default_rng(2).uniform(0, 255, (1, 3, 12, 14)).astype(np.float32)
        write_mean(str(window_file / "mean.binaryproto"), full)
        transform += f' mean_file: "{window_file}/mean.binaryproto"'
        mean = full[0, :, 2:12, 2:12]  # centred by the width on both axes, as Caffe
    text_ = text(window_file, c["crop_mode"], c["context_pad"], f"scale: {c['scale']}",
                 transform, batch=8)
    layer, top = make_layer(text_, [], n_top=2, dtype=np.float32, seed=11)
    assert [t.shape for t in top] == [(8, 3, 10, 10), (8,)]
    layer.forward([], top)
    data, labels = reference_batch(window_file, 11, 8, 10, c["context_pad"],
                                   c["crop_mode"] == "square", c["mirror"], mean, c["scale"])
    np.testing.assert_array_equal(top[1].data, labels)
    assert np.all(labels[:4] == 0) and np.all(labels[4:] > 0)
    # OpenCV's vectorised resize rounds some pixels one level off its scalar formula, which
    # Moka's resize_linear follows; a misplaced or mis-sized window would differ by far more.
    np.testing.assert_allclose(top[0].data, data, rtol=0, atol=c["scale"] * 1.0001)
    np.testing.assert_array_equal(top[0].data == 0, data == 0)  # pixels are >= 40: 0 is pad


def test_window_file_sorting_and_determinism(window_file):
    layer, top = make_layer(text(window_file, extra="cache_images: true"), [], n_top=2,
                            seed=3)
    assert [w[1] for w in layer.windows.foreground] == [1, 2, 3, 1]
    assert [w[2] for w in layer.windows.foreground] == pytest.approx([0.9, 0.6, 0.7, 0.5])
    assert [w[0] for w in layer.windows.background] == [0, 1, 2]
    assert all(w[1] == 0 for w in layer.windows.background)
    layer.forward([], top)
    again, again_top = make_layer(text(window_file), [], n_top=2, seed=3)
    again.forward([], again_top)
    np.testing.assert_array_equal(top[0].data, again_top[0].data)
    layer.forward([], top)
    assert not np.array_equal(top[0].data, again_top[0].data)  # the next batch draws anew


def write(folder, lines):
    (folder / "windows.txt").write_text("\n".join(lines) + "\n")


def test_window_data_errors(window_file):
    with pytest.raises(LayerError, match="crop_size must be positive"):
        make_layer(text(window_file).replace("crop_size: 10", ""), [], n_top=2)
    with pytest.raises(LayerError, match='crop_mode must be "warp" or "square"'):
        make_layer(text(window_file, crop_mode="stretch"), [], n_top=2)
    with pytest.raises(LayerError, match="context_pad 5 leaves no room"):
        make_layer(text(window_file, context_pad=5), [], n_top=2)
    write(window_file, ["# 0", "im0.png", "3 24 32", "1", "0 0.9 1 1 5 5"])
    with pytest.raises(DataError, match=r"line 5: a foreground window .*class index > 0"):
        make_layer(text(window_file), [], n_top=2)
    write(window_file, ["# 0", "im0.png", "3 24 32", "1", "2 0.9 1 1 5 5"])
    with pytest.raises(DataError, match="no background windows"):
        make_layer(text(window_file), [], n_top=2)
    write(window_file, ["0", "im0.png"])
    with pytest.raises(DataError, match="line 1: expected '#'"):
        make_layer(text(window_file), [], n_top=2)
    write(window_file, ["# 0", "im0.png", "3 24 32", "2", "2 0.9 1 1 5 5", "0 0.1 1 1 x 5"])
    with pytest.raises(DataError, match="line 6: expected a window corner, got 'x'"):
        make_layer(text(window_file), [], n_top=2)
    write(window_file, ["# 3", "im0.png", "3 24 32", "2", "2 0.9 1 1 5 5", "0 0.1 1 1 4 5"])
    with pytest.raises(DataError, match="image index 3, but only 1 images"):
        make_layer(text(window_file), [], n_top=2)
    write(window_file, ["# 0", "im0.png", "3 24 32", "2", "2 0.9 1 1 5 5", "0 0.1 1 1 40 5"])
    layer, top = make_layer(text(window_file, batch=2), [], n_top=2)
    with pytest.raises(DataError, match=r"window \(1, 1, 40, 5\) does not lie inside image"):
        layer.forward([], top)
    with pytest.raises(DataError, match="cannot read the window file"):
        make_layer(text(window_file / "missing"), [], n_top=2)


PASCAL = (Path(__file__).resolve().parents[3] / "shared" / "conformance"
          / "BVLC__caffe__examples__finetune_pascal_detection__pascal_finetune_trainval_test"
          ".prototxt")


@pytest.mark.skipif(not PASCAL.is_file(), reason="conformance corpus not found")
def test_caffes_rcnn_finetuning_data_layers_read_a_window_file(window_file):
    """The data layers of Caffe's examples/finetune_pascal_detection net (context_pad 16,
    crop 227, mirror, a mean file) as written, their sources pointed at the tiny window file."""
    write_mean(str(window_file / "mean.binaryproto"),
               np.full((3, 256, 256), 100, np.float32))
    param = read_net_param(str(PASCAL))
    del param.layer[2:]  # the TRAIN and TEST WindowData layers; CaffeNet itself is too slow here
    for layer in param.layer:
        layer.window_data_param.source = str(window_file / "windows.txt")
        layer.window_data_param.root_folder = f"{window_file}/"
        layer.window_data_param.batch_size = 4
        layer.transform_param.mean_file = str(window_file / "mean.binaryproto")
    for phase in (engine.TRAIN, engine.TEST):
        net = Net(param, phase, rng=np.random.default_rng(0))
        net.forward()
        assert net.blobs["data"].shape == (4, 3, 227, 227)
        labels = net.blobs["label"].data
        assert np.all(labels[:3] == 0) and labels[3] > 0  # int(4 * 0.25) foreground window
        assert np.abs(net.blobs["data"].data).max() > 0
