"""ReLU6 (MobileNet v2 ports) and Axpy (SENet): forward against the ports' loops, gradients,
in place, errors, and ReLU6 against OpenCV's dnn implementation."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer, random_blob, run_forward_backward

from engine.blob import Blob
from engine.errors import LayerError


def relu6_loop(x):
    return np.array([min(max(v, 0.0), 6.0) for v in x.reshape(-1)]).reshape(x.shape)


def test_relu6_forward_and_backward_follow_the_port():
    x = np.array([-3.0, -0.0, 0.0, 0.5, 5.9, 6.0, 6.5, 100.0]).reshape(2, 4)
    dy = np.arange(1.0, 9.0).reshape(2, 4)
    for in_place in (False, True):
        y, dx = run_forward_backward('type: "ReLU6"', x, dy, in_place)
        np.testing.assert_array_equal(y, relu6_loop(x))
        np.testing.assert_array_equal(dx, dy * ((x > 0) & (x < 6)))  # both ends excluded


def test_relu6_gradient_away_from_the_kinks():
    rng = np.random.default_rng(1)
    values = rng.uniform(-3, 9, (2, 3, 4, 4))
    values[np.abs(values) < 0.01] += 0.05
    values[np.abs(values - 6) < 0.01] += 0.05
    x = blob_of(values)
    layer, top = make_layer('type: "ReLU6"', [x])
    check_gradient(layer, [x], top)


def test_relu6_matches_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "relu6.prototxt"
    path.write_text('name: "t" input: "data" input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }\n'
                    'layer { name: "r" type: "ReLU6" bottom: "data" top: "out" }\n')
    x = random_blob((2, 3, 4, 5), seed=2, low=-4, high=10, dtype=np.float32)
    net = cv2.dnn.readNetFromCaffe(str(path))
    net.setInput(x.data)
    np.testing.assert_array_equal(net.forward(), relu6_loop(x.data.astype(np.float64)))


def axpy_loop(a, x, y):
    """axpy_layer.cpp: top = y, then per (n, c) plane top += a[n, c] * x."""
    top = y.copy()
    for n, c in np.ndindex(*x.shape[:2]):
        top[n, c] += a.reshape(x.shape[:2])[n, c] * x[n, c]
    return top


@pytest.mark.parametrize("a_shape", [(2, 3, 1, 1), (2, 3)])
def test_axpy_forward_and_gradients(a_shape):
    a, x, y = random_blob(a_shape, 1), random_blob((2, 3, 4, 5), 2), random_blob((2, 3, 4, 5), 3)
    layer, top = make_layer('type: "Axpy"', [a, x, y])
    assert top[0].shape == (2, 3, 4, 5)
    layer.forward([a, x, y], top)
    np.testing.assert_allclose(top[0].data, axpy_loop(a.data, x.data, y.data), rtol=1e-14)
    check_gradient(layer, [a, x, y], top)


def test_axpy_propagate_down_is_per_bottom():
    """The SENet port tests propagate_down[0] for x's diff; here each bottom has its own."""
    a, x, y = random_blob((1, 2, 1, 1), 1), random_blob((1, 2, 3, 3), 2), random_blob((1, 2, 3, 3))
    layer, top = make_layer('type: "Axpy"', [a, x, y])
    layer.forward([a, x, y], top)
    top[0].diff[...] = 1
    for blob in (a, x, y):
        blob.diff[...] = 7
    layer.backward(top, [False, True, False], [a, x, y])
    np.testing.assert_array_equal(a.diff, 7)
    np.testing.assert_array_equal(y.diff, 7)
    np.testing.assert_allclose(x.diff, np.broadcast_to(a.data, x.shape))


@pytest.mark.parametrize(("shapes", "match"), [
    (((2, 3, 2, 1), (2, 3, 4, 4), (2, 3, 4, 4)), "must be \\(N, C\\) or \\(N, C, 1, 1\\)"),
    (((2, 4), (2, 3, 4, 4), (2, 3, 4, 4)), "must be \\(N, C\\)"),
    (((2, 3), (2, 3, 4, 4), (2, 3, 4, 5)), "same shape"),
])
def test_axpy_shape_errors(shapes, match):
    with pytest.raises(LayerError, match=match):
        make_layer('type: "Axpy"', [Blob(s, np.float64) for s in shapes])
