"""EuclideanLoss, SigmoidCrossEntropyLoss, HingeLoss, MultinomialLogisticLoss."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine.errors import LayerError


def run(layer, bottom, top, loss_weight: float = 1.0, propagate=(True, False)):
    """Forward, then backward with ``loss_weight`` as the top diff; returns the loss."""
    layer.forward(bottom, top)
    top[0].diff[...] = loss_weight
    layer.backward(top, list(propagate), bottom)
    return float(top[0].data)


# -- EuclideanLoss ---------------------------------------------------------------------------
def test_euclidean_forward_and_both_gradients():
    a = blob_of([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    b = blob_of([[0.0, 2.0], [1.0, 1.0], [0.0, -2.0]])
    layer, top = make_layer('type: "EuclideanLoss"', [a, b])
    assert top[0].shape == ()
    loss = run(layer, [a, b], top, loss_weight=3.0, propagate=(True, True))
    assert loss == pytest.approx((1 + 0 + 4 + 9 + 0 + 4) / (2 * 3))
    np.testing.assert_allclose(a.diff, 3.0 * (a.data - b.data) / 3)
    np.testing.assert_allclose(b.diff, -3.0 * (a.data - b.data) / 3)
    assert layer.allow_force_backward(1)
    assert layer.default_loss_weight(0) == 1.0


def test_euclidean_accepts_same_count_other_shape():
    a, b = random_blob((2, 3, 2), seed=1), random_blob((2, 6), seed=2)
    layer, top = make_layer('type: "EuclideanLoss"', [a, b])
    run(layer, [a, b], top, propagate=(True, True))
    diff = a.data.reshape(2, 6) - b.data
    assert float(top[0].data) == pytest.approx(np.sum(diff**2) / 4)
    np.testing.assert_allclose(b.diff, -diff / 2)


def test_euclidean_gradient_check():
    a, b = random_blob((3, 2, 2), seed=1), random_blob((3, 2, 2), seed=2)
    layer, top = make_layer('type: "EuclideanLoss"', [a, b])
    assert check_gradient(layer, [a, b], top) == 24


def test_euclidean_count_mismatch():
    with pytest.raises(LayerError, match=r"same count.*\(2, 3\).*\(2, 4\)"):
        make_layer('type: "EuclideanLoss"', [random_blob((2, 3)), random_blob((2, 4))])


# -- SigmoidCrossEntropyLoss ---------------------------------------------------------------------
def naive_sigmoid_xent(x: np.ndarray, t: np.ndarray, ignore: int | None = None):
    """(summed loss, count) by the textbook formula, element by element."""
    total, count = 0.0, 0
    for xi, ti in zip(x.ravel(), t.ravel(), strict=True):
        if int(ti) == ignore:
            continue
        p = 1 / (1 + math.exp(-xi))
        total -= ti * math.log(p) + (1 - ti) * math.log(1 - p)
        count += 1
    return total, count


@pytest.mark.parametrize("loss_param, divide_by", [
    ("", "batch"),  # SigmoidCrossEntropyLoss defaults to BATCH_SIZE, not VALID
    ("normalization: VALID", "valid"),
    ("normalization: FULL", "full"),
    ("normalization: NONE", "none"),
    ("normalize: true", "valid"),
])
def test_sigmoid_xent_forward(loss_param, divide_by):
    rng = np.random.default_rng(3)
    x = blob_of(rng.uniform(-4, 4, (3, 2, 2)))
    t = rng.uniform(0, 1, (3, 2, 2))
    t[0, 0, :] = -1  # ignored
    t = blob_of(t)
    layer, top = make_layer(
        f'type: "SigmoidCrossEntropyLoss" loss_param {{ ignore_label: -1 {loss_param} }}',
        [x, t])
    layer.forward([x, t], top)
    total, valid = naive_sigmoid_xent(x.data, t.data, ignore=-1)
    divisor = {"batch": 3, "valid": valid, "full": 12, "none": 1}[divide_by]
    assert valid == 10
    np.testing.assert_allclose(top[0].data, total / divisor, rtol=1e-12)


def test_sigmoid_xent_is_stable_for_large_inputs():
    x, t = blob_of([[1000.0, -1000.0, 1000.0, -1000.0]]), blob_of([[1.0, 0.0, 0.0, 1.0]])
    layer, top = make_layer('type: "SigmoidCrossEntropyLoss"', [x, t], dtype=np.float32)
    loss = run(layer, [x, t], top)
    assert loss == pytest.approx(2000.0)
    np.testing.assert_allclose(x.diff, [[0.0, 0.0, 1.0, -1.0]])


def test_sigmoid_xent_gradient_and_ignored_zero():
    rng = np.random.default_rng(4)
    x = blob_of(rng.uniform(-3, 3, (2, 3, 2)))
    t = rng.uniform(0, 1, (2, 3, 2))
    t[1, 2, :] = 7
    t = blob_of(t)
    layer, top = make_layer(
        'type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: 7 normalization: VALID }',
        [x, t])
    assert check_gradient(layer, [x, t], top, check_bottom=[0]) == 12
    run(layer, [x, t], top, loss_weight=2.0)
    expected = (1 / (1 + np.exp(-x.data)) - t.data) * 2.0 / 10
    expected[1, 2, :] = 0
    np.testing.assert_allclose(x.diff, expected, rtol=1e-12)


def test_sigmoid_xent_count_mismatch():
    with pytest.raises(LayerError, match="same count"):
        make_layer('type: "SigmoidCrossEntropyLoss"', [random_blob((2, 3)), random_blob((2, 2))])


# -- HingeLoss -------------------------------------------------------------------------------
def naive_hinge(x: np.ndarray, labels: np.ndarray, squared: bool) -> float:
    total = 0.0
    for n, row in enumerate(x.reshape(len(x), -1)):
        for k, v in enumerate(row):
            t = 1 if k == int(labels[n]) else -1
            h = max(0.0, 1 - t * v)
            total += h * h if squared else h
    return total / len(x)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_forward_and_gradient(norm):
    x = blob_of([[0.5, -2.0, 1.5], [0.2, 0.3, -0.4]])
    labels = blob_of([0, 2])
    layer, top = make_layer(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}',
                            [x, labels])
    loss = run(layer, [x, labels], top, loss_weight=2.0)
    # h: row 0 = [0.5, 0, 2.5]; row 1 = [1.2, 1.3, 1.4]
    if norm == "L1":
        assert loss == pytest.approx((0.5 + 2.5 + 1.2 + 1.3 + 1.4) / 2)
        expected = np.array([[-1, 0, 1], [1, 1, -1]]) * 2.0 / 2
    else:
        assert loss == pytest.approx((0.25 + 6.25 + 1.44 + 1.69 + 1.96) / 2)
        expected = 2 * np.array([[-0.5, 0, 2.5], [1.2, 1.3, -1.4]]) * 2.0 / 2
    np.testing.assert_allclose(x.diff, expected)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_gradient_check(norm):
    rng = np.random.default_rng(5)
    # the hinge kinks at x = +-1: draw around points at least 0.5 away from them
    x = rng.choice([-1.5, -0.5, 0.0, 0.5, 1.5], (3, 4)) + rng.uniform(-0.2, 0.2, (3, 4))
    x = blob_of(x)
    labels = blob_of(rng.integers(0, 4, 3))
    layer, top = make_layer(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}',
                            [x, labels])
    layer.forward([x, labels], top)
    assert float(top[0].data) == pytest.approx(naive_hinge(x.data, labels.data, norm == "L2"))
    assert check_gradient(layer, [x, labels], top, check_bottom=[0]) == 12


def test_hinge_needs_one_label_per_item():
    with pytest.raises(LayerError, match="one label per item"):
        make_layer('type: "HingeLoss"', [random_blob((2, 3)), random_blob((2, 2))])


# -- MultinomialLogisticLoss -----------------------------------------------------------------------
def test_multinomial_logistic_forward_gradient_and_clip():
    p = blob_of([[0.2, 0.5, 0.3], [0.0, 0.4, 0.6]])
    labels = blob_of([1, 0])
    layer, top = make_layer('type: "MultinomialLogisticLoss"', [p, labels])
    loss = run(layer, [p, labels], top, loss_weight=0.5)
    # p[1, 0] = 0 is clipped to 1e-20: -log(1e-20) = 46.0517
    assert loss == pytest.approx((-math.log(0.5) - math.log(1e-20)) / 2)
    expected = np.zeros((2, 3))
    expected[0, 1] = -0.5 / 2 / 0.5
    expected[1, 0] = -0.5 / 2 / 1e-20
    np.testing.assert_allclose(p.diff, expected)


def test_multinomial_logistic_gradient_check():
    rng = np.random.default_rng(6)
    p = blob_of(rng.uniform(0.1, 1.0, (3, 4, 1, 1)))
    labels = blob_of(rng.integers(0, 4, (3, 1, 1, 1)))
    layer, top = make_layer('type: "MultinomialLogisticLoss"', [p, labels])
    assert check_gradient(layer, [p, labels], top, check_bottom=[0]) == 12


@pytest.mark.parametrize("layer_type", ["HingeLoss", "MultinomialLogisticLoss",
                                        "SigmoidCrossEntropyLoss"])
def test_no_gradient_to_labels(layer_type):
    x, labels = random_blob((2, 3), low=0.1), blob_of([[0, 1, 0], [1, 0, 0]])
    if layer_type != "SigmoidCrossEntropyLoss":
        labels = blob_of([0, 2])
    layer, top = make_layer(f'type: "{layer_type}"', [x, labels])
    assert not layer.allow_force_backward(1)
    layer.forward([x, labels], top)
    with pytest.raises(LayerError, match="labels"):
        layer.backward(top, [True, True], [x, labels])


@pytest.mark.parametrize("layer_type", ["HingeLoss", "MultinomialLogisticLoss"])
def test_label_out_of_range(layer_type):
    x, labels = random_blob((2, 3), low=0.1), blob_of([0, 3])
    layer, top = make_layer(f'type: "{layer_type}"', [x, labels])
    with pytest.raises(LayerError, match=r"label 3 .*outside \[0, 3\)"):
        layer.forward([x, labels], top)
