"""Softmax and SoftmaxWithLoss: shapes, forward against naive loops, gradients, Caffe quirks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine.blob import Blob
from engine.errors import LayerError

SATURATED = -math.log(np.finfo(np.float32).tiny)  # 87.3365, Caffe's loss for p = 0


def naive_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax by explicit loops over every position but the class axis."""
    moved = np.moveaxis(x, axis, -1)
    out = np.empty_like(moved)
    for index in np.ndindex(moved.shape[:-1]):
        row = [math.exp(v) for v in moved[index]]
        out[index] = [v / sum(row) for v in row]
    return np.moveaxis(out, -1, axis)


def naive_loss_sum(scores: np.ndarray, labels: np.ndarray, axis: int,
                   ignore: int | None = None) -> tuple[float, int]:
    """(-sum log p[label] over non-ignored positions, their count), by loops."""
    prob = np.moveaxis(naive_softmax(scores, axis), axis, -1)
    labels = labels.reshape(prob.shape[:-1])
    total, count = 0.0, 0
    for index in np.ndindex(labels.shape):
        label = int(labels[index])
        if label == ignore:
            continue
        total -= math.log(max(prob[index][label], np.finfo(np.float32).tiny))
        count += 1
    return total, count


# -- Softmax -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis", [
    ((2, 5), 1), ((2, 3, 4), 1), ((2, 3, 4), 2), ((2, 3, 4), -1), ((2, 3, 2, 2), 0), ((4,), 0),
])
def test_softmax_shape_and_forward(shape, axis):
    bottom = random_blob(shape, seed=1, low=-3, high=3)
    layer, top = make_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [bottom])
    assert top[0].shape == shape
    layer.forward([bottom], top)
    np.testing.assert_allclose(top[0].data, naive_softmax(bottom.data, axis), rtol=1e-12)
    np.testing.assert_allclose(top[0].data.sum(axis=axis), 1.0, rtol=1e-12)


def test_softmax_hand_values_and_large_inputs():
    bottom = blob_of([[0.0, math.log(2), math.log(3)], [1000.0, 1000.0, -1000.0]])
    layer, top = make_layer('type: "Softmax"', [bottom])
    layer.forward([bottom], top)
    np.testing.assert_allclose(top[0].data, [[1 / 6, 2 / 6, 3 / 6], [0.5, 0.5, 0.0]],
                               rtol=1e-12, atol=1e-300)


def test_softmax_float32_stays_float32():
    bottom = random_blob((3, 4), dtype=np.float32)
    layer, top = make_layer('type: "Softmax"', [bottom], dtype=np.float32)
    layer.forward([bottom], top)
    assert top[0].data.dtype == np.float32


@pytest.mark.parametrize("shape, axis", [((2, 4, 3), 1), ((2, 3, 4), 2), ((3, 2, 2), -2)])
def test_softmax_gradient(shape, axis):
    bottom = random_blob(shape, seed=2, low=-2, high=2)
    layer, top = make_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [bottom])
    assert check_gradient(layer, [bottom], top) == bottom.count


def test_softmax_in_place_matches_out_of_place():
    x = np.random.default_rng(3).uniform(-2, 2, (2, 3, 4))
    dy = np.random.default_rng(4).uniform(-1, 1, x.shape)
    out_bottom = blob_of(x)
    layer, top = make_layer('type: "Softmax"', [out_bottom])
    layer.forward([out_bottom], top)
    top[0].diff[...] = dy
    layer.backward(top, [True], [out_bottom])

    shared = blob_of(x)
    layer2, _ = make_layer('type: "Softmax"', [shared])
    layer2.reshape([shared], [shared])
    layer2.forward([shared], [shared])
    shared.diff[...] = dy
    layer2.backward([shared], [True], [shared])
    np.testing.assert_allclose(shared.data, top[0].data, rtol=1e-12)
    np.testing.assert_allclose(shared.diff, out_bottom.diff, rtol=1e-12)


def test_softmax_bad_axis_names_layer():
    with pytest.raises(LayerError, match=r"softmax.*axis 3"):
        make_layer('type: "Softmax" softmax_param { axis: 3 }', [random_blob((2, 3))])


# -- SoftmaxWithLoss ---------------------------------------------------------------------------
def loss_layer(extra: str, scores: Blob, labels: Blob, n_top: int = 1, dtype=np.float64):
    return make_layer(f'type: "SoftmaxWithLoss" {extra}', [scores, labels], n_top=n_top,
                      dtype=dtype)


def spatial_case(seed: int = 5, ignore: int | None = None):
    """Scores (2, 4, 3, 2) and labels (2, 1, 3, 2), a few of them ``ignore``."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-2, 2, (2, 4, 3, 2))
    labels = rng.integers(0, 4, (2, 1, 3, 2)).astype(float)
    if ignore is not None:
        labels[0, 0, 1, :] = ignore
        labels[1, 0, 2, 1] = ignore
    return blob_of(scores), blob_of(labels)


@pytest.mark.parametrize("loss_param, divide_by", [
    ("", "valid"),
    ("normalization: VALID", "valid"),
    ("normalization: FULL", "full"),
    ("normalization: BATCH_SIZE", "batch"),
    ("normalization: NONE", "none"),
    ("normalize: true", "valid"),
    ("normalize: false", "batch"),
    ("normalize: false normalization: FULL", "full"),  # normalization wins when set
])
def test_normalization_modes(loss_param, divide_by):
    # ignore_label 3 is also a class index, so some positions drop out and VALID != FULL
    scores, labels = spatial_case(ignore=3)
    layer, top = loss_layer(f"loss_param {{ ignore_label: 3 {loss_param} }}", scores, labels)
    layer.forward([scores, labels], top)
    total, valid = naive_loss_sum(scores.data, labels.data, 1, ignore=3)
    divisor = {"valid": valid, "full": 2 * 3 * 2, "batch": 2, "none": 1}[divide_by]
    assert valid < 12
    assert top[0].shape == ()
    np.testing.assert_allclose(top[0].data, total / divisor, rtol=1e-12)


def test_ignored_positions_get_zero_gradient():
    scores, labels = spatial_case(ignore=-1)
    layer, top = loss_layer("loss_param { ignore_label: -1 }", scores, labels)
    layer.forward([scores, labels], top)
    total, valid = naive_loss_sum(scores.data, labels.data, 1, ignore=-1)
    np.testing.assert_allclose(top[0].data, total / valid, rtol=1e-12)
    top[0].diff[...] = 1
    layer.backward(top, [True, False], [scores, labels])
    ignored = (labels.data == -1)[:, 0]  # (2, 3, 2)
    assert np.all(np.moveaxis(scores.diff, 1, -1)[ignored] == 0)
    assert np.all(np.moveaxis(scores.diff, 1, -1)[~ignored] != 0)


def test_gradient_is_p_minus_onehot_over_normalizer_times_loss_weight():
    scores = blob_of([[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]])
    labels = blob_of([2, 0])
    layer, top = loss_layer("", scores, labels)
    layer.forward([scores, labels], top)
    top[0].diff[...] = 2.5  # the loss weight, as the Net seeds it
    layer.backward(top, [True, False], [scores, labels])
    expected = naive_softmax(scores.data, 1)
    expected[[0, 1], [2, 0]] -= 1
    np.testing.assert_allclose(scores.diff, expected * 2.5 / 2, rtol=1e-12)


@pytest.mark.parametrize("score_shape, axis, label_shape", [
    ((2, 4, 3, 2), 1, (2, 1, 3, 2)),
    ((2, 4, 3, 2), 1, (2, 3, 2)),
    ((2, 3, 2, 4), -1, (2, 3, 2)),
    ((2, 3, 5), 2, (2, 3)),
    ((3, 5), 1, (3,)),
])
def test_axis_and_label_shapes(score_shape, axis, label_shape):
    rng = np.random.default_rng(6)
    classes = score_shape[axis]
    scores = blob_of(rng.uniform(-2, 2, score_shape))
    labels = blob_of(rng.integers(0, classes, label_shape))
    layer, top = loss_layer(f"softmax_param {{ axis: {axis} }}", scores, labels, n_top=2)
    assert top[0].shape == ()
    assert top[1].shape == score_shape
    layer.forward([scores, labels], top)
    total, valid = naive_loss_sum(scores.data, labels.data, axis)
    np.testing.assert_allclose(top[0].data, total / valid, rtol=1e-12)
    np.testing.assert_allclose(top[1].data, naive_softmax(scores.data, axis), rtol=1e-12)


@pytest.mark.parametrize("extra", [
    "",
    "loss_param { ignore_label: 1 normalization: FULL }",
    "loss_param { normalization: BATCH_SIZE } softmax_param { axis: 2 }",
    "loss_param { normalization: NONE ignore_label: 0 } softmax_param { axis: -1 }",
])
def test_gradient_check(extra):
    rng = np.random.default_rng(7)
    scores = blob_of(rng.uniform(-2, 2, (2, 3, 3)))
    labels = blob_of(rng.integers(0, 3, (2, 3)))
    layer, top = loss_layer(extra, scores, labels)
    assert check_gradient(layer, [scores, labels], top, check_bottom=[0]) == scores.count


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_loss_is_clamped_at_flt_min(dtype):
    scores = blob_of([[0.0, 200.0], [-150.0, 150.0]], dtype)
    labels = blob_of([0, 0], dtype)
    layer, top = loss_layer("loss_param { normalization: NONE }", scores, labels, dtype=dtype)
    layer.forward([scores, labels], top)
    assert top[0].data.dtype == dtype
    np.testing.assert_allclose(top[0].data, 2 * SATURATED, rtol=1e-6)
    assert round(SATURATED, 4) == 87.3365


def test_labels_are_truncated_to_int():
    scores = blob_of([[1.0, 2.0, 3.0]])
    layer, top = loss_layer("", scores, blob_of([1.9]))
    layer.forward([scores, blob_of([1.9])], top)
    np.testing.assert_allclose(top[0].data, -math.log(naive_softmax(scores.data, 1)[0, 1]))


def test_all_ignored_gives_zero_loss_and_gradient():
    scores, labels = random_blob((2, 3)), blob_of([5, 5])
    layer, top = loss_layer("loss_param { ignore_label: 5 }", scores, labels)
    layer.forward([scores, labels], top)
    assert top[0].data == 0
    top[0].diff[...] = 1
    layer.backward(top, [True, False], [scores, labels])
    assert np.all(scores.diff == 0)


def test_prob_top_has_zero_default_loss_weight():
    layer, _ = loss_layer("", random_blob((2, 3)), blob_of([0, 1]), n_top=2)
    assert layer.default_loss_weight(0) == 1.0
    assert layer.default_loss_weight(1) == 0.0
    assert not layer.allow_force_backward(1)


def test_label_count_mismatch_names_both_shapes():
    with pytest.raises(LayerError, match=r"\(2, 3, 4\).*\(2, 3\)"):
        loss_layer("", random_blob((2, 3, 4)), blob_of(np.zeros((2, 3))))


@pytest.mark.parametrize("bad", [3, -1])
def test_out_of_range_label_is_an_error(bad):
    scores, labels = random_blob((2, 3)), blob_of([0, bad])
    layer, top = loss_layer("", scores, labels)
    with pytest.raises(LayerError, match=rf"label {bad} .*outside \[0, 3\)"):
        layer.forward([scores, labels], top)


def test_backward_to_labels_is_an_error():
    scores, labels = random_blob((2, 3)), blob_of([0, 1])
    layer, top = loss_layer("", scores, labels)
    layer.forward([scores, labels], top)
    with pytest.raises(LayerError, match="labels"):
        layer.backward(top, [True, True], [scores, labels])


# -- SegNet/ENet class weighting -------------------------------------------------------------
WEIGHTS = "weight_by_label_freqs: true class_weighting: 0.5 class_weighting: 2 " \
          "class_weighting: 1.5 class_weighting: 0.25"


def segnet_weighted_loss(scores, labels, weights, ignore):
    """softmax_loss_layer.cpp (SegNet): sum of -w[label] log p over the kept positions, divided
    by their count; gradient (p - onehot) * w[label] / count."""
    n, _, h, w = scores.shape
    loss, count, grad = 0.0, 0, np.zeros_like(scores)
    for i, y, x in np.ndindex(n, h, w):
        label = int(labels[i, 0, y, x])
        if label == ignore:
            continue
        p = np.exp(scores[i, :, y, x] - scores[i, :, y, x].max())
        p /= p.sum()
        loss -= math.log(max(p[label], 1.1754944e-38)) * weights[label]
        grad[i, :, y, x] = p * weights[label]
        grad[i, label, y, x] -= weights[label]
        count += 1
    return loss / count, grad / count


def test_class_weighting_follows_segnet():
    scores, labels = spatial_case(ignore=3)
    layer, (top,) = loss_layer(f"loss_param {{ {WEIGHTS} ignore_label: 3 }}", scores, labels)
    layer.forward([scores, labels], [top])
    loss, grad = segnet_weighted_loss(scores.data, labels.data, [0.5, 2, 1.5, 0.25], 3)
    np.testing.assert_allclose(float(top.data), loss, rtol=1e-12)
    top.diff[...] = 1
    layer.backward([top], [True, False], [scores, labels])
    np.testing.assert_allclose(scores.diff, grad, rtol=1e-12, atol=1e-15)
    assert check_gradient(layer, [scores, labels], [top], check_bottom=[0]) == scores.count


def test_class_weighting_needs_one_weight_per_class():
    scores, labels = spatial_case()
    with pytest.raises(LayerError, match="one class_weighting value per class \\(4\\); got 2"):
        loss_layer("loss_param { weight_by_label_freqs: true class_weighting: 1 "
                   "class_weighting: 2 }", scores, labels)
