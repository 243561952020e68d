"""Permute and Normalize (the SSD fork): shapes, forward against the fork's loops, gradients."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import make_layer, random_blob

from engine.errors import LayerError


def permute(order: list[int], bottom):
    orders = " ".join(f"order: {o}" for o in order)
    return make_layer(f'type: "Permute" permute_param {{ {orders} }}', [bottom])


def naive_permute(x: np.ndarray, order: list[int]) -> np.ndarray:
    """The fork's index walk: each top index decomposed by the top's steps into old indices."""
    top_shape = [x.shape[a] for a in order]
    y = np.empty(top_shape)
    for index in itertools.product(*map(range, top_shape)):
        old = [0] * x.ndim
        for new_axis, old_axis in enumerate(order):
            old[old_axis] = index[new_axis]
        y[index] = x[tuple(old)]
    return y


# (order given, the full order the fork completes it to)
ORDERS = [([0, 2, 3, 1], [0, 2, 3, 1]), ([0, 2], [0, 2, 1, 3]), ([3], [3, 0, 1, 2]),
          ([], [0, 1, 2, 3]), ([1, 0, 3, 2], [1, 0, 3, 2])]


@pytest.mark.parametrize(("order", "full"), ORDERS)
def test_permute_forward_matches_the_forks_loop(order, full):
    x = random_blob((2, 3, 4, 5), seed=1)
    layer, top = permute(order, x)
    assert layer.order == full
    assert top[0].shape == tuple(x.shape[a] for a in full)
    layer.forward([x], top)
    np.testing.assert_array_equal(top[0].data, naive_permute(x.data, full))


@pytest.mark.parametrize("order", [[0, 2, 3, 1], [2, 0], [1, 0, 3, 2]])
def test_permute_gradient(order):
    x = random_blob((2, 3, 2, 3), seed=2)
    layer, top = permute(order, x)
    assert check_gradient(layer, [x], top) > 0


@pytest.mark.parametrize(("order", "message"), [([0, 4], "distinct axes below 4"),
                                                ([1, 1], "distinct")])
def test_permute_errors(order, message):
    with pytest.raises(LayerError, match=message):
        permute(order, random_blob((2, 3, 4, 5)))


# -- Normalize ----------------------------------------------------------------------------------
def normalize(across: bool, shared: bool, bottom, extra: str = ""):
    text = (f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
            f'channel_shared: {str(shared).lower()} {extra} }}')
    return make_layer(text, [bottom])


def naive_normalize(x, scale, across, shared, eps):
    """The fork's loops: per image (across) or per pixel, sqrt(sum of squares + eps)."""
    n, c, h, w = x.shape
    y = np.empty_like(x)
    for i in range(n):
        if across:
            norm = np.sqrt(sum(x[i, k, p, q] ** 2 for k in range(c) for p in range(h)
                               for q in range(w)) + eps)
            y[i] = x[i] / norm
        else:
            for p, q in itertools.product(range(h), range(w)):
                norm = np.sqrt(sum(x[i, k, p, q] ** 2 for k in range(c)) + eps)
                y[i, :, p, q] = x[i, :, p, q] / norm
        for k in range(c):
            y[i, k] *= scale if shared else scale[k]
    return y


VARIANTS = list(itertools.product([True, False], [True, False]))


@pytest.mark.parametrize(("across", "shared"), VARIANTS)
def test_normalize_forward_matches_the_forks_loops(across, shared):
    x = random_blob((2, 3, 4, 5), seed=3)
    filler = 'scale_filler { type: "uniform" min: 1 max: 20 } eps: 0.01'
    layer, top = normalize(across, shared, x, filler)
    assert layer.blobs[0].shape == (() if shared else (3,))
    assert top[0].shape == x.shape
    layer.forward([x], top)
    scale = layer.blobs[0].data if not shared else float(layer.blobs[0].data)
    expected = naive_normalize(x.data, scale, across, shared, float(np.float32(0.01)))
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)


def test_normalize_defaults():
    """across_spatial and channel_shared default to true, scale to 1, eps to 1e-10."""
    x = random_blob((2, 3, 2, 2), seed=4)
    layer, top = make_layer('type: "Normalize"', [x])
    assert layer.blobs[0].shape == ()
    assert float(layer.blobs[0].data) == 1
    layer.forward([x], top)
    norms = np.sqrt((top[0].data ** 2).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(norms, 1, rtol=1e-9)


@pytest.mark.parametrize(("across", "shared"), VARIANTS)
def test_normalize_gradient(across, shared):
    x = random_blob((2, 3, 2, 3), seed=5)
    layer, top = normalize(across, shared, x, 'scale_filler { type: "uniform" min: 1 max: 3 }')
    assert check_gradient(layer, [x], top) > 0


def test_normalize_scale_diff_accumulates():
    x = random_blob((2, 3, 2, 2), seed=6)
    layer, top = normalize(False, False, x)
    layer.forward([x], top)
    top[0].diff[...] = 1
    layer.blobs[0].diff[...] = 0
    layer.backward(top, [False], [x])
    once = layer.blobs[0].diff.copy()
    layer.backward(top, [False], [x])
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once)
    np.testing.assert_allclose(once, (x.data / layer.norm).sum(axis=(0, 2, 3)))
