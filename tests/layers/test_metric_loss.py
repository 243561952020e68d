"""ContrastiveLoss and InfogainLoss: goldens from naive loops, gradients, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob

from engine.blob import Blob
from engine.errors import LayerError
from engine.io import write_blob_proto


def run(layer, bottom, top, loss_weight: float = 1.0, propagate=(True, False)):
    layer.forward(bottom, top)
    top[0].diff[...] = loss_weight
    layer.backward(top, list(propagate), bottom)
    return float(top[0].data)


# -- ContrastiveLoss -------------------------------------------------------------------------
def pairs():
    """Four pairs: two similar, two dissimilar (one inside margin 1.5, one outside)."""
    a = blob_of([[0.0, 0.0], [1.0, 1.0], [0.0, 0.5], [2.0, 0.0]])
    b = blob_of([[0.3, 0.4], [1.0, 0.0], [0.3, 0.1], [0.0, 0.0]])
    y = blob_of([1.0, 1.0, 0.0, 0.0])
    return a, b, y


def naive_contrastive(a, b, y, margin, legacy):
    total = 0.0
    for ai, bi, yi in zip(a, b, y, strict=True):
        d2 = float(np.sum((ai - bi) ** 2))
        if int(yi):
            total += d2
        elif legacy:
            total += max(margin - d2, 0.0)
        else:
            total += max(margin - math.sqrt(d2), 0.0) ** 2
    return total / len(a) / 2


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_forward_and_backward(legacy):
    a, b, y = pairs()
    text = (f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: 1.5 '
            f'legacy_version: {str(legacy).lower()} }}')
    layer, top = make_layer(text, [a, b, y])
    assert top[0].shape == ()
    loss = run(layer, [a, b, y], top, loss_weight=2.0, propagate=(True, True, False))
    assert loss == pytest.approx(naive_contrastive(a.data, b.data, y.data, 1.5, legacy))
    diff = a.data - b.data
    expected = np.zeros_like(diff)
    expected[:2] = diff[:2]  # similar pairs
    d = np.linalg.norm(diff[2])  # 0.5, inside the margin; pair 3 (d = 2) is outside
    expected[2] = -diff[2] if legacy else -(1.5 - d) / (d + 1e-4) * diff[2]
    np.testing.assert_allclose(a.diff, 2.0 * expected / 4)
    np.testing.assert_allclose(b.diff, -2.0 * expected / 4)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_gradient_check(legacy):
    a, b, y = pairs()
    text = f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: 1.5 ' \
           f'legacy_version: {str(legacy).lower()} }}'
    layer, top = make_layer(text, [a, b, y])
    assert check_gradient(layer, [a, b, y], top, check_bottom=[0, 1]) == 16


def test_contrastive_default_margin_and_checks():
    a, b, y = pairs()
    layer, top = make_layer('type: "ContrastiveLoss"', [a, b, y])
    layer.forward([a, b, y], top)
    assert float(top[0].data) == pytest.approx(naive_contrastive(a.data, b.data, y.data, 1.0,
                                                                 False))
    assert layer.allow_force_backward(1) and not layer.allow_force_backward(2)
    with pytest.raises(LayerError, match="bottom 2"):
        layer.backward(top, [True, True, True], [a, b, y])
    with pytest.raises(LayerError, match="same shape"):
        make_layer('type: "ContrastiveLoss"', [a, random_blob((4, 3)), y])
    with pytest.raises(LayerError, match="one similarity label per pair"):
        make_layer('type: "ContrastiveLoss"', [a, b, blob_of([1.0, 0.0])])


# -- InfogainLoss ----------------------------------------------------------------------------
H = np.array([[1.0, 0.5, 0.0], [0.2, 2.0, 0.1], [0.0, 0.3, 1.5]])


def naive_infogain(x, labels, h, ignore=None):
    """(summed loss, valid count) with the class axis 1 of (N, L, inner) scores."""
    total, count = 0.0, 0
    n, classes, inner = x.shape
    for i in range(n):
        for j in range(inner):
            if ignore is not None and int(labels[i, j]) == ignore:
                continue
            e = np.exp(x[i, :, j] - x[i, :, j].max())
            p = e / e.sum()
            for k in range(classes):
                total -= h[int(labels[i, j]), k] * math.log(max(p[k], 1e-20))
            count += 1
    return total, count


@pytest.mark.parametrize("loss_param, divide_by", [
    ("", "valid"),
    ("loss_param { normalization: FULL }", "full"),
    ("loss_param { normalization: BATCH_SIZE }", "batch"),
    ("loss_param { normalization: NONE }", "none"),
    ("loss_param { ignore_label: 1 }", "valid"),
    ("loss_param { ignore_label: 1 normalization: FULL }", "full"),
])
def test_infogain_forward_with_h_bottom(loss_param, divide_by):
    rng = np.random.default_rng(4)
    x = blob_of(rng.uniform(-2, 2, (2, 3, 2)))
    labels = blob_of([[0.0, 1.0], [2.0, 1.0]])
    layer, top = make_layer(f'type: "InfogainLoss" {loss_param}', [x, labels, blob_of(H)])
    layer.forward([x, labels, blob_of(H)], top)
    ignore = 1 if "ignore_label" in loss_param else None
    total, count = naive_infogain(x.data, labels.data, H, ignore)
    norm = {"valid": count, "full": 4, "batch": 2, "none": 1}[divide_by]
    assert float(top[0].data) == pytest.approx(total / norm)


def test_infogain_identity_h_is_softmax_loss_and_second_top_is_prob(tmp_path):
    x = random_blob((3, 4), seed=5)
    labels = blob_of([3.0, 0.0, 2.0])
    source = tmp_path / "h.binaryproto"
    write_blob_proto(blob_of(np.eye(4)).to_proto(), source)
    text = f'type: "InfogainLoss" infogain_loss_param {{ source: "{source}" }}'
    layer, top = make_layer(text, [x, labels], n_top=2)
    assert top[1].shape == (3, 4) and layer.default_loss_weight(1) == 0
    run(layer, [x, labels], top, loss_weight=1.5)
    e = np.exp(x.data - x.data.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(top[1].data, p)
    rows = (np.arange(3), [3, 0, 2])
    assert float(top[0].data) == pytest.approx(-np.log(p[rows]).mean())
    onehot = np.zeros((3, 4))
    onehot[rows] = 1
    np.testing.assert_allclose(x.diff, 1.5 * (p - onehot) / 3)


@pytest.mark.parametrize("axis, shape, label_shape", [
    (1, (2, 3, 2), (2, 2)),
    (-1, (2, 2, 3), (2, 2)),
])
def test_infogain_gradient_check(axis, shape, label_shape):
    x = random_blob(shape, seed=6)
    labels = blob_of(np.array([0.0, 2.0, 1.0, 2.0]).reshape(label_shape))
    text = f'type: "InfogainLoss" infogain_loss_param {{ axis: {axis} }} ' \
           'loss_param { ignore_label: 0 }'
    layer, top = make_layer(text, [x, labels, blob_of(H)])
    assert check_gradient(layer, [x, labels, blob_of(H)], top, check_bottom=[0]) == 12


def test_infogain_axis_matches_naive_loop():
    x = random_blob((2, 2, 3), seed=7)  # classes on the last axis
    labels = blob_of([[0.0, 2.0], [1.0, 1.0]])
    text = 'type: "InfogainLoss" infogain_loss_param { axis: 2 }'
    layer, top = make_layer(text, [x, labels, blob_of(H)])
    layer.forward([x, labels, blob_of(H)], top)
    total, count = naive_infogain(x.data.reshape(4, 3, 1),
                                  labels.data.reshape(4, 1), H)
    assert float(top[0].data) == pytest.approx(total / count)


def test_infogain_float32():
    x, labels = random_blob((2, 3), dtype=np.float32), blob_of([0.0, 1.0], np.float32)
    h = blob_of(H, np.float32)
    layer, top = make_layer('type: "InfogainLoss"', [x, labels, h], dtype=np.float32)
    run(layer, [x, labels, h], top)
    assert top[0].data.dtype == np.float32 and x.diff.dtype == np.float32


@pytest.mark.parametrize("text, bottoms, match", [
    ('type: "InfogainLoss"', 2, "source"),
    ('type: "InfogainLoss" infogain_loss_param { source: "/nonexistent.binaryproto" }', 2,
     "cannot read the H matrix"),
    ('type: "InfogainLoss" loss_param { normalize: true }', 3, "deprecated"),
])
def test_infogain_setup_errors(text, bottoms, match):
    bottom = [random_blob((2, 3)), blob_of([0.0, 1.0]), blob_of(H)][:bottoms]
    with pytest.raises(LayerError, match=match):
        make_layer(text, bottom)


def test_infogain_shape_and_label_errors():
    x = random_blob((2, 3))
    with pytest.raises(LayerError, match="H must be 3 x 3"):
        make_layer('type: "InfogainLoss"', [x, blob_of([0.0, 1.0]), blob_of(np.eye(2))])
    layer, top = make_layer('type: "InfogainLoss"', [x, blob_of([0.0, 3.0]), blob_of(H)])
    with pytest.raises(LayerError, match="outside"):
        layer.forward([x, blob_of([0.0, 3.0]), blob_of(H)], top)
    assert not layer.allow_force_backward(2)
    with pytest.raises(LayerError, match="labels"):
        layer.backward(top, [True, True, False], [x, blob_of([0.0, 1.0]), blob_of(H)])


def test_infogain_reads_a_non_identity_h_from_source(tmp_path):
    path = tmp_path / "h.binaryproto"
    write_blob_proto(Blob.to_proto(blob_of(H)), path)
    x, labels = random_blob((2, 3)), blob_of([1.0, 2.0])
    layer, top = make_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{path}" }}',
                            [x, labels])
    layer.forward([x, labels], top)
    total, count = naive_infogain(x.data.reshape(2, 3, 1), labels.data.reshape(2, 1), H)
    assert float(top[0].data) == pytest.approx(total / count)
