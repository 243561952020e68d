"""PriorBox and DetectionOutput (the SSD fork): shapes, forward against naive loops written
after the fork's own loops, hand-computed NMS cases, and the training-only types' message."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from google.protobuf import text_format
from layer_helpers import blob_of, make_layer, random_blob

import engine
from engine import caffe_pb2
from engine.errors import LayerError, NetError
from engine.io import read_net_param


# -- PriorBox ------------------------------------------------------------------------------------
def prior_box(params: str, feature_hw=(3, 4), image_hw=(30, 40)):
    bottoms = [random_blob((2, 5, *feature_hw)), random_blob((2, 3, *image_hw))]
    layer, top = make_layer(f'type: "PriorBox" prior_box_param {{ {params} }}', bottoms)
    layer.forward(bottoms, top)
    return layer, top[0].data


def naive_prior_box(fh, fw, img_h, img_w, min_sizes, max_sizes, ratios, flip, clip, variance,
                    step=None, offset=0.5):
    """The fork's loops: cell by cell, min box, max box, then the other aspect ratios."""
    full = [1.0]
    for r in ratios:
        if all(abs(r - k) >= 1e-6 for k in full):
            full += [r, 1 / r] if flip else [r]
    step_h, step_w = step or (img_h / fh, img_w / fw)
    boxes = []
    for h, w in itertools.product(range(fh), range(fw)):
        cx, cy = (w + offset) * step_w, (h + offset) * step_h
        for s, mn in enumerate(min_sizes):
            mn = int(mn)
            sizes = [(mn, mn)]
            if max_sizes:
                side = math.sqrt(mn * int(max_sizes[s]))
                sizes.append((side, side))
            sizes += [(mn * math.sqrt(r), mn / math.sqrt(r)) for r in full if abs(r - 1) >= 1e-6]
            for bw, bh in sizes:
                boxes.append([(cx - bw / 2) / img_w, (cy - bh / 2) / img_h,
                              (cx + bw / 2) / img_w, (cy + bh / 2) / img_h])
    boxes = np.array(boxes)
    if clip:
        boxes = np.clip(boxes, 0, 1)
    var = np.broadcast_to(np.array(variance, float), boxes.shape)
    return np.stack([boxes.ravel(), var.ravel()])[None]


PRIOR_CASES = [
    # flip and two aspect ratios, with max_size: 1 + 1 + 2*2 = 6 priors per cell
    ("min_size: 8 max_size: 18 aspect_ratio: 2 aspect_ratio: 3 flip: true "
     "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2",
     dict(min_sizes=[8], max_sizes=[18], ratios=[2, 3], flip=True, clip=False,
          variance=[0.1, 0.1, 0.2, 0.2]), 6),
    # the same without max_size, clipped: the corner cells' boxes stick out of the image
    ("min_size: 12 aspect_ratio: 2 aspect_ratio: 3 clip: true",
     dict(min_sizes=[12], max_sizes=[], ratios=[2, 3], flip=True, clip=True, variance=[0.1]), 5),
    # two min sizes (each with a max), no flip, a repeated ratio and ratio 1 (both ignored)
    ("min_size: 6 min_size: 10.7 max_size: 9 max_size: 20 aspect_ratio: 2 aspect_ratio: 2 "
     "aspect_ratio: 1 flip: false variance: 0.5",
     dict(min_sizes=[6, 10.7], max_sizes=[9, 20], ratios=[2, 2, 1], flip=False, clip=False,
          variance=[0.5]), 6),
]


@pytest.mark.parametrize(("params", "kwargs", "per_cell"), PRIOR_CASES,
                         ids=["flip-max", "clip-nomax", "two-sizes"])
def test_prior_box_matches_the_forks_loops(params, kwargs, per_cell):
    layer, top = prior_box(params)
    assert layer.num_priors == per_cell
    assert top.shape == (1, 2, 3 * 4 * per_cell * 4)
    np.testing.assert_allclose(top, naive_prior_box(3, 4, 30, 40, **kwargs), rtol=0, atol=1e-6)
    if kwargs["clip"]:
        assert top[0, 0].min() == 0 and top[0, 0].max() == 1


def test_prior_box_hand_computed():
    """One 1x1 cell on a 10x10 image, min 4, max 9, ratio 2 with flip."""
    _, top = prior_box("min_size: 4 max_size: 9 aspect_ratio: 2", (1, 1), (10, 10))
    r = math.sqrt(2)
    expected = [[3, 3, 7, 7], [2, 2, 8, 8],  # the min box, the sqrt(4*9) = 6 box
                [5 - 2 * r, 5 - 1 / r * 2, 5 + 2 * r, 5 + 2 / r],  # 4*sqrt2 wide, 4/sqrt2 high
                [5 - 2 / r, 5 - 2 * r, 5 + 2 / r, 5 + 2 * r]]
    np.testing.assert_allclose(top[0, 0].reshape(4, 4), np.array(expected) / 10, atol=1e-6)
    np.testing.assert_allclose(top[0, 1], 0.1, rtol=1e-6)  # the default variance


def test_prior_box_explicit_image_size_step_and_offset():
    params = "min_size: 5 img_h: 50 img_w: 60 step_h: 9 step_w: 11 offset: 0.25"
    _, top = prior_box(params)
    expected = naive_prior_box(3, 4, 50, 60, [5], [], [], True, False, [0.1], step=(9, 11),
                               offset=0.25)
    np.testing.assert_allclose(top, expected, atol=1e-6)
    _, same = prior_box("min_size: 5 img_size: 50 step: 9")
    expected = naive_prior_box(3, 4, 50, 50, [5], [], [], True, False, [0.1], step=(9, 9))
    np.testing.assert_allclose(same, expected, atol=1e-6)


@pytest.mark.parametrize(("params", "message"), [
    ("max_size: 5", "min_size"),
    ("min_size: 5 max_size: 4", "greater than its min_size"),
    ("min_size: 5 min_size: 6 max_size: 9", "max_size for 2 min_size"),
    ("min_size: 5 variance: 0.1 variance: 0.2", "1 or 4"),
    ("min_size: 5 step: 4 step_h: 2 step_w: 2", "either step or step_h/step_w"),
    ("min_size: 5 img_h: 10", "img_h and img_w must both be positive"),
])
def test_prior_box_errors(params, message):
    with pytest.raises(LayerError, match=message):
        prior_box(params)


# -- DetectionOutput -------------------------------------------------------------------------------
def naive_decode(prior, var, loc, code, encoded):
    """The fork's DecodeBBox for one box, coordinate by coordinate."""
    v = [1, 1, 1, 1] if encoded else var
    pw, ph = prior[2] - prior[0], prior[3] - prior[1]
    if code == "CORNER":
        return [prior[i] + v[i] * loc[i] for i in range(4)]
    if code == "CORNER_SIZE":
        size = [pw, ph, pw, ph]
        return [prior[i] + v[i] * loc[i] * size[i] for i in range(4)]
    cx = v[0] * loc[0] * pw + (prior[0] + prior[2]) / 2
    cy = v[1] * loc[1] * ph + (prior[1] + prior[3]) / 2
    w, h = math.exp(v[2] * loc[2]) * pw, math.exp(v[3] * loc[3]) * ph
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def naive_iou(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0

    def size(box):
        return 0.0 if box[2] < box[0] or box[3] < box[1] else (box[2] - box[0]) * (box[3] - box[1])

    inter = iw * ih
    return inter / (size(a) + size(b) - inter)


def naive_detection_output(loc, conf, prior, num_classes, share, background, code, encoded,
                           conf_thr, nms_thr, top_k, keep_top_k, eta=1.0):
    """The fork's Forward_cpu, image by image, class by class, box by box."""
    num, n_priors = loc.shape[0], prior.shape[2] // 4
    n_loc = 1 if share else num_classes
    priors, variances = prior[0, 0].reshape(-1, 4), prior[0, 1].reshape(-1, 4)
    rows = []
    for i in range(num):
        locs = loc[i].reshape(n_priors, n_loc, 4)
        scores = conf[i].reshape(n_priors, num_classes)
        picks = []
        for c in range(num_classes):
            if c == background:
                continue
            lc = 0 if share else c
            boxes = [naive_decode(priors[p], variances[p], locs[p, lc], code, encoded)
                     for p in range(n_priors)]
            order = sorted((p for p in range(n_priors) if scores[p, c] > conf_thr),
                           key=lambda p: -scores[p, c])  # sorted() is stable, as the fork's
            if top_k > -1:
                order = order[:top_k]
            kept, thr = [], nms_thr
            for p in order:
                if all(naive_iou(boxes[p], boxes[k]) <= thr for k in kept):
                    kept.append(p)
                    if eta < 1 and thr > 0.5:
                        thr *= eta
            picks += [(c, p, scores[p, c], boxes[p]) for p in kept]
        if -1 < keep_top_k < len(picks):
            best = sorted(picks, key=lambda pick: -pick[2])[:keep_top_k]
            picks = sorted(best, key=lambda pick: pick[0])
        rows += [[i, c, s, *box] for c, _, s, box in picks]
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(num)], float)
    return np.array(rows)


def detection_output(params: str, loc, conf, prior):
    bottoms = [blob_of(loc), blob_of(conf), blob_of(prior)]
    layer, top = make_layer(f'type: "DetectionOutput" detection_output_param {{ {params} }}',
                            bottoms)
    layer.forward(bottoms, top)
    return top[0].data


def random_head(num, n_priors, num_classes, n_loc, seed):
    """Priors on a jittered grid (many overlaps), random offsets, softmax scores."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.2, 0.8, (n_priors, 2))
    half = rng.uniform(0.1, 0.3, (n_priors, 2))
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    variance = np.tile([0.1, 0.1, 0.2, 0.2], (n_priors, 1))
    prior = np.stack([boxes.ravel(), variance.ravel()])[None]
    loc = rng.normal(0, 0.5, (num, n_priors * n_loc * 4))
    logits = rng.normal(0, 2, (num, n_priors, num_classes))
    conf = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return loc, conf.reshape(num, -1), prior


HEAD_CASES = [
    ("CORNER", True, False, 0.01, 0.45, -1, -1, 1.0),
    ("CENTER_SIZE", True, False, 0.05, 0.3, 10, -1, 1.0),
    ("CORNER_SIZE", True, False, 0.02, 0.5, -1, 7, 1.0),
    ("CENTER_SIZE", False, False, 0.05, 0.45, 8, 9, 1.0),   # a box set per class
    ("CORNER", False, True, 0.1, 0.4, -1, -1, 1.0),
    ("CENTER_SIZE", True, True, 0.01, 0.7, -1, 5, 0.8),     # adaptive NMS
]


@pytest.mark.parametrize(("code", "share", "encoded", "conf_thr", "nms_thr", "top_k",
                          "keep_top_k", "eta"), HEAD_CASES)
def test_detection_output_matches_the_forks_loops(code, share, encoded, conf_thr, nms_thr,
                                                  top_k, keep_top_k, eta):
    num_classes, n_priors = 4, 30
    loc, conf, prior = random_head(2, n_priors, num_classes, 1 if share else num_classes,
                                   seed=len(code) + top_k)
    params = (f"num_classes: {num_classes} share_location: {str(share).lower()} "
              f"background_label_id: 0 code_type: {code} "
              f"variance_encoded_in_target: {str(encoded).lower()} keep_top_k: {keep_top_k} "
              f"confidence_threshold: {conf_thr} nms_param {{ nms_threshold: {nms_thr} "
              f"eta: {eta} {f'top_k: {top_k}' if top_k > -1 else ''} }}")
    out = detection_output(params, loc, conf, prior)
    expected = naive_detection_output(
        loc, conf, prior, num_classes, share, 0, code, encoded, float(np.float32(conf_thr)),
        float(np.float32(nms_thr)), top_k, keep_top_k, float(np.float32(eta)))
    assert out.shape == (1, 1, len(expected), 7)
    assert len(expected) > 2
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-9, atol=1e-12)


def test_nms_suppresses_overlapping_boxes():
    """Three boxes on one object (IoU 0.81, 0.64 with the best) and one apart: the two weaker
    overlapping ones go; class 2 keeps its box since NMS works per class."""
    prior = np.array([[0.1, 0.1, 0.5, 0.5], [0.14, 0.14, 0.5, 0.5], [0.1, 0.1, 0.42, 0.42],
                      [0.6, 0.6, 0.9, 0.9]])
    prior = np.stack([prior.ravel(), np.full(16, 0.1)])[None]
    conf = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.1, 0.6, 0.3], [0.3, 0.5, 0.2]])
    loc = np.zeros((1, 16))
    params = "num_classes: 3 nms_param { nms_threshold: 0.5 } confidence_threshold: 0.25"
    out = detection_output(params, loc, conf.reshape(1, -1), prior)[0, 0]
    expected = [[0, 1, 0.9, 0.1, 0.1, 0.5, 0.5], [0, 1, 0.5, 0.6, 0.6, 0.9, 0.9],
                [0, 2, 0.3, 0.1, 0.1, 0.42, 0.42]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    loose = detection_output(params.replace("0.5 }", "0.85 }"), loc, conf.reshape(1, -1), prior)
    assert loose.shape[2] == 5  # 0.81 and 0.64 are now below the threshold: all of class 1 kept


def test_no_detection_gives_one_placeholder_row_per_image():
    loc, conf, prior = random_head(3, 5, 3, 1, seed=1)
    out = detection_output("num_classes: 3 confidence_threshold: 0.999", loc, conf, prior)
    assert out.shape == (1, 1, 3, 7)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 1, 2])
    assert (out[0, 0, :, 1:] == -1).all()


def test_saving_and_visualising_are_ignored_with_a_warning(caplog):
    loc, conf, prior = random_head(1, 5, 3, 1, seed=3)
    params = 'num_classes: 3 save_output_param { output_directory: "out" } visualize: true'
    out = detection_output(params, loc, conf, prior)
    assert out.shape[-1] == 7
    assert "save_output_param and visualize are not implemented" in caplog.text


def test_detection_output_shape_errors():
    loc, conf, prior = random_head(1, 5, 3, 1, seed=2)
    with pytest.raises(LayerError, match="bottom 1 should hold"):
        detection_output("num_classes: 4", loc, conf, prior)
    with pytest.raises(LayerError, match="num_classes"):
        detection_output("share_location: false", loc, conf, prior)


# -- the SSD fork's training side --------------------------------------------------------------
SSD_TRAIN = """
name: "ssd_train"
layer { name: "data" type: "AnnotatedData" top: "data" top: "label"
  include { phase: TRAIN }
  transform_param {
    mirror: true mean_value: 104 mean_value: 117 mean_value: 123
    resize_param { prob: 1 resize_mode: WARP height: 300 width: 300
                   interp_mode: LINEAR interp_mode: AREA interp_mode: NEAREST }
    emit_constraint { emit_type: CENTER }
    distort_param { brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5
                    contrast_lower: 0.5 contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 }
    expand_param { prob: 0.5 max_expand_ratio: 4.0 }
    noise_param { prob: 0 saltpepper_param { fraction: 0.1 value: 0 } }
  }
  data_param { source: "trainval_lmdb" batch_size: 32 backend: LMDB }
  annotated_data_param {
    batch_sampler { max_sample: 1 max_trials: 1 }
    batch_sampler { sampler { min_scale: 0.3 max_scale: 1.0 min_aspect_ratio: 0.5
                              max_aspect_ratio: 2.0 }
                    sample_constraint { min_jaccard_overlap: 0.1 } max_sample: 1
                    max_trials: 50 }
    label_map_file: "labelmap_voc.prototxt"
  }
}
layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "data" bottom: "label" top: "loss"
  include { phase: TRAIN }
  propagate_down: true propagate_down: false
  loss_param { normalization: VALID }
  multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1.0
    num_classes: 21 share_location: true match_type: PER_PREDICTION overlap_threshold: 0.5
    use_prior_for_matching: true background_label_id: 0 use_difficult_gt: true
    neg_pos_ratio: 3.0 neg_overlap: 0.5 code_type: CENTER_SIZE ignore_cross_boundary_bbox: false
    mining_type: MAX_NEGATIVE }
}
layer { name: "input" type: "Input" top: "data" top: "label" include { phase: TEST }
  input_param { shape { dim: 1 dim: 3 dim: 30 dim: 30 } shape { dim: 1 dim: 1 dim: 2 dim: 8 } }
}
layer { name: "detection_eval" type: "DetectionEvaluate" bottom: "data" bottom: "label"
  top: "detection_eval" include { phase: TEST }
  detection_evaluate_param { num_classes: 21 background_label_id: 0 overlap_threshold: 0.5
    evaluate_difficult_gt: false name_size_file: "test_name_size.txt" }
}
"""

SSD_SOLVER = """
train_net: "train.prototxt" test_net: "test.prototxt" test_iter: 619 test_interval: 10000
base_lr: 0.001 lr_policy: "multistep" gamma: 0.1 stepvalue: 80000 momentum: 0.9
weight_decay: 0.0005 iter_size: 1 type: "SGD" solver_mode: GPU device_id: 0
debug_info: false snapshot_after_train: true test_initialization: false average_loss: 10
eval_type: "detection" ap_version: "11point" show_per_class_result: true
"""


def test_the_ssd_forks_training_files_parse():
    net = read_net_param(SSD_TRAIN, is_text=True)
    data = net.layer[0]
    assert data.annotated_data_param.batch_sampler[1].sampler.min_scale == pytest.approx(0.3)
    assert data.transform_param.expand_param.max_expand_ratio == 4
    assert list(data.transform_param.resize_param.interp_mode) == [1, 2, 3]
    assert net.layer[1].multibox_loss_param.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE
    solver = text_format.Parse(SSD_SOLVER, caffe_pb2.SolverParameter())
    assert (solver.eval_type, solver.ap_version) == ("detection", "11point")
    assert solver.show_per_class_result and solver.layer_wise_reduce  # BVLC's 41 kept


@pytest.mark.parametrize(("phase", "layer", "kind"), [
    (engine.TRAIN, "data", "AnnotatedData"), (engine.TEST, "detection_eval", "DetectionEvaluate"),
])
def test_training_only_layers_stop_with_one_clear_line(phase, layer, kind):
    net = read_net_param(SSD_TRAIN, is_text=True)
    with pytest.raises(NetError) as failure:
        engine.Net(net, phase)
    message = str(failure.value)
    assert "\n" not in message
    assert f"layer '{layer}'" in message and f"'{kind}' is not supported" in message
    assert "SSD fork" in message and "unknown" not in message


def test_the_command_line_says_not_supported_in_one_line(tmp_path, capsys):
    from engine.cli import main

    model = tmp_path / "train.prototxt"
    model.write_text(SSD_TRAIN)
    assert main(["time", "--model", str(model), "--iterations", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "layer 'data'" in err[0] and "'AnnotatedData' is not supported" in err[0]
