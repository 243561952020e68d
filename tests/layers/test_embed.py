"""Embed: shapes, lookup golden, parameter gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradient
from layer_helpers import blob_of, make_layer

from engine.errors import LayerError

FILLERS = 'weight_filler { type: "gaussian" } bias_filler { type: "uniform" min: -1 max: 1 }'


def embed(num_output: int = 3, input_dim: int = 5, extra: str = "") -> str:
    return (f'type: "Embed" embed_param {{ num_output: {num_output} input_dim: {input_dim} '
            f'{FILLERS} {extra} }}')


@pytest.mark.parametrize("bias", [True, False])
def test_embed_forward_is_a_row_lookup(bias):
    x = blob_of([[4.0, 0.0, 4.0], [2.0, 1.0, 3.0]])
    layer, top = make_layer(embed(extra=f"bias_term: {str(bias).lower()}"), [x])
    assert top[0].shape == (2, 3, 3)
    assert [b.shape for b in layer.blobs] == [(5, 3), (3,)][:2 if bias else 1]
    layer.forward([x], top)
    w = layer.blobs[0].data
    b = layer.blobs[1].data if bias else 0
    for n in range(2):
        for t in range(3):
            np.testing.assert_allclose(top[0].data[n, t], w[int(x.data[n, t])] + b)


def test_embed_backward_scatters_repeated_indices():
    x = blob_of([1.0, 3.0, 1.0])
    layer, top = make_layer(embed(num_output=2, input_dim=4), [x])
    layer.forward([x], top)
    top[0].diff[...] = [[1, 2], [3, 4], [5, 6]]
    layer.blobs[0].diff[...] = 1  # param diffs accumulate
    layer.backward(top, [False], [x])
    np.testing.assert_array_equal(layer.blobs[0].diff, [[1, 1], [7, 9], [1, 1], [4, 5]])
    np.testing.assert_array_equal(layer.blobs[1].diff, [9, 12])


def test_embed_gradient_check():
    x = blob_of([[0.0, 2.0], [2.0, 4.0]])
    layer, top = make_layer(embed(), [x])
    assert check_gradient(layer, [x], top, check_bottom=[]) == 15 + 3


def test_embed_float32_keeps_dtype():
    x = blob_of([1.0, 2.0], np.float32)
    layer, top = make_layer(embed(), [x], dtype=np.float32)
    layer.forward([x], top)
    assert top[0].data.dtype == np.float32 and layer.blobs[0].data.dtype == np.float32


@pytest.mark.parametrize("value", [5.0, -1.0, 1.5])
def test_embed_rejects_bad_indices(value):
    x = blob_of([0.0, value])
    layer, top = make_layer(embed(), [x])
    with pytest.raises(LayerError, match=r"position 1 .*not an integer in \[0, 5\)"):
        layer.forward([x], top)


def test_embed_errors():
    with pytest.raises(LayerError, match="input_dim 0"):
        make_layer('type: "Embed" embed_param { num_output: 3 }', [blob_of([0.0])])
    x = blob_of([0.0])
    layer, top = make_layer(embed(), [x])
    assert not layer.allow_force_backward(0)
    layer.forward([x], top)
    with pytest.raises(LayerError, match="indices"):
        layer.backward(top, [True], [x])
