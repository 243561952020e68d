"""Accuracy: top-k with Caffe's tie rule, ignore_label, per-class top, axis, errors."""

from __future__ import annotations

import numpy as np
import pytest
from layer_helpers import blob_of, make_layer, random_blob

from engine.errors import LayerError


def naive_accuracy(scores: np.ndarray, labels: np.ndarray, axis: int, top_k: int,
                   ignore: int | None = None) -> tuple[float, np.ndarray]:
    """Caffe's loop: correct iff fewer than top_k other classes score >= the true class."""
    moved = np.moveaxis(scores, axis, -1)
    labels = labels.reshape(moved.shape[:-1])
    classes = moved.shape[-1]
    hits, counts = np.zeros(classes), np.zeros(classes)
    for index in np.ndindex(labels.shape):
        label = int(labels[index])
        if label == ignore:
            continue
        counts[label] += 1
        better = sum(1 for v in moved[index] if v >= moved[index][label]) - 1
        if better < top_k:
            hits[label] += 1
    total = hits.sum() / counts.sum() if counts.sum() else 0.0
    per_class = np.divide(hits, counts, out=np.zeros(classes), where=counts > 0)
    return total, per_class


def accuracy_layer(extra: str, scores, labels, n_top: int = 1):
    return make_layer(f'type: "Accuracy" accuracy_param {{ {extra} }}', [scores, labels],
                      n_top=n_top)


def test_top1_hand_values_and_shapes():
    scores = blob_of([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    labels = blob_of([1, 1, 2, 0])
    layer, top = accuracy_layer("", scores, labels, n_top=2)
    assert top[0].shape == ()
    assert top[1].shape == (3,)
    assert layer.default_loss_weight(0) == 0.0
    layer.forward([scores, labels], top)
    assert float(top[0].data) == pytest.approx(2 / 4)
    np.testing.assert_allclose(top[1].data, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("top_k, expected", [(1, 0.0), (2, 0.0), (3, 1.0)])
def test_ties_count_against_the_true_class(top_k, expected):
    # three classes tie with the true one: it is in the top k only when k >= 3
    scores = blob_of([[0.5, 0.5, 0.5, 0.1]])
    layer, top = accuracy_layer(f"top_k: {top_k}", scores, blob_of([1]))
    layer.forward([scores, blob_of([1])], top)
    assert float(top[0].data) == expected


def test_top3_hand_values():
    scores = blob_of([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5], [3, 3, 3, 3, 0], [0, 9, 9, 0, 0]])
    labels = blob_of([2, 1, 4, 0])
    # row 0: 2 better -> hit; row 1: 3 better -> miss; row 2: label is the unique lowest, 4
    # better -> miss; row 3: 0 ties with classes 3, 4 and loses to 1, 2 -> 4 >= -> miss
    layer, top = accuracy_layer("top_k: 3", scores, labels, n_top=2)
    layer.forward([scores, labels], top)
    assert float(top[0].data) == pytest.approx(1 / 4)
    np.testing.assert_allclose(top[1].data, [0, 0, 1, 0, 0])


@pytest.mark.parametrize("score_shape, axis, label_shape, top_k, ignore", [
    ((6, 4), 1, (6,), 1, None),
    ((6, 4), 1, (6, 1, 1, 1), 3, None),
    ((3, 5, 2, 2), 1, (3, 1, 2, 2), 2, 0),
    ((3, 2, 2, 5), -1, (3, 2, 2), 1, 4),
    ((2, 3, 4), 2, (2, 3), 3, -1),
])
def test_against_naive_loop(score_shape, axis, label_shape, top_k, ignore):
    rng = np.random.default_rng(8)
    scores = blob_of(rng.integers(0, 3, score_shape))  # small integers: many ties
    labels = rng.integers(0, score_shape[axis], label_shape).astype(float)
    if ignore is not None:
        labels.reshape(-1)[::3] = ignore
    labels = blob_of(labels)
    extra = f"top_k: {top_k} axis: {axis}" + ("" if ignore is None else f" ignore_label: {ignore}")
    layer, top = accuracy_layer(extra, scores, labels, n_top=2)
    layer.forward([scores, labels], top)
    total, per_class = naive_accuracy(scores.data, labels.data, axis, top_k, ignore)
    assert float(top[0].data) == pytest.approx(total)
    np.testing.assert_allclose(top[1].data, per_class)


def test_ignored_labels_leave_the_denominator():
    scores = blob_of([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = blob_of([0, -1, 1])
    layer, top = accuracy_layer("ignore_label: -1", scores, labels)
    layer.forward([scores, labels], top)
    assert float(top[0].data) == pytest.approx(1 / 2)


def test_all_ignored_gives_zero():
    scores, labels = random_blob((2, 3)), blob_of([7, 7])
    layer, top = accuracy_layer("ignore_label: 7", scores, labels, n_top=2)
    layer.forward([scores, labels], top)
    assert float(top[0].data) == 0
    np.testing.assert_array_equal(top[1].data, 0)


def test_float32_output():
    scores, labels = random_blob((4, 3), dtype=np.float32), blob_of([0, 1, 2, 0], np.float32)
    layer, top = make_layer('type: "Accuracy"', [scores, labels], dtype=np.float32)
    layer.forward([scores, labels], top)
    assert top[0].data.dtype == np.float32


def test_top_k_larger_than_classes_is_an_error():
    with pytest.raises(LayerError, match=r"top_k \(4\).*\(3"):
        accuracy_layer("top_k: 4", random_blob((2, 3)), blob_of([0, 1]))


def test_label_count_mismatch_names_both_shapes():
    with pytest.raises(LayerError, match=r"\(2, 3, 4\).*\(2,\)"):
        accuracy_layer("", random_blob((2, 3, 4)), blob_of([0, 1]))


def test_out_of_range_label_is_an_error():
    scores, labels = random_blob((2, 3)), blob_of([0, 3])
    layer, top = accuracy_layer("", scores, labels)
    with pytest.raises(LayerError, match=r"label 3 .*outside \[0, 3\)"):
        layer.forward([scores, labels], top)


def test_no_backward():
    scores, labels = random_blob((2, 3)), blob_of([0, 1])
    layer, top = accuracy_layer("", scores, labels)
    layer.forward([scores, labels], top)
    layer.backward(top, [False, False], [scores, labels])  # nothing asked: fine
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="no gradient"):
        layer.backward(top, [True, False], [scores, labels])
