"""Fillers against Caffe's definitions (include/caffe/filler.hpp)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from engine import caffe_pb2
from engine.errors import NetError
from engine.fillers import fill


def filler(text: str) -> caffe_pb2.FillerParameter:
    return text_format.Parse(text, caffe_pb2.FillerParameter())


def draw(text: str, shape=(100, 50, 3, 3), seed=0) -> np.ndarray:
    return fill(shape, filler(text), np.random.default_rng(seed))


def test_default_filler_is_constant_zero():
    assert not np.any(draw(""))


def test_constant():
    assert np.all(draw('type: "constant" value: 2.5', (3, 4)) == 2.5)


def test_uniform_range_and_mean():
    values = draw('type: "uniform" min: -2 max: 3')
    assert values.min() >= -2 and values.max() <= 3
    assert values.mean() == pytest.approx(0.5, abs=0.05)


def test_gaussian_moments():
    values = draw('type: "gaussian" mean: 1 std: 0.5')
    assert values.mean() == pytest.approx(1.0, abs=0.02)
    assert values.std() == pytest.approx(0.5, abs=0.02)


def test_gaussian_sparse_keeps_sparse_over_num_outputs():
    shape = (20, 1000)
    values = draw('type: "gaussian" sparse: 5', shape)
    assert np.mean(values != 0) == pytest.approx(5 / 20, abs=0.02)


def test_sparse_only_with_gaussian():
    with pytest.raises(NetError, match="sparse"):
        draw('type: "uniform" sparse: 3')


def test_positive_unitball_rows_sum_to_one():
    values = draw('type: "positive_unitball"', (7, 3, 2, 2))
    assert np.all(values >= 0)
    np.testing.assert_allclose(values.reshape(7, -1).sum(axis=1), 1.0)


@pytest.mark.parametrize(("norm", "n"), [
    ("FAN_IN", 50 * 9), ("FAN_OUT", 100 * 9), ("AVERAGE", (50 * 9 + 100 * 9) / 2)])
def test_xavier_is_uniform_with_caffes_fan(norm, n):
    values = draw(f'type: "xavier" variance_norm: {norm}')
    bound = np.sqrt(3.0 / n)
    assert np.abs(values).max() <= bound
    assert np.abs(values).max() > 0.99 * bound
    assert values.var() == pytest.approx(1.0 / n, rel=0.05)


@pytest.mark.parametrize(("norm", "n"), [("FAN_IN", 50 * 9), ("FAN_OUT", 100 * 9)])
def test_msra_is_gaussian_with_variance_two_over_n(norm, n):
    values = draw(f'type: "msra" variance_norm: {norm}')
    assert values.mean() == pytest.approx(0.0, abs=0.002)
    assert values.var() == pytest.approx(2.0 / n, rel=0.05)


def test_bilinear_kernel_matches_the_formula():
    values = draw('type: "bilinear"', (2, 1, 4, 4))
    f, c = 2.0, 3 / 4  # f = ceil(K/2), c = (K-1)/(2f)
    ramp = [1 - abs(x / f - c) for x in range(4)]
    np.testing.assert_allclose(values[1, 0], np.outer(ramp, ramp))
    np.testing.assert_allclose(values[0, 0, 1], [0.1875, 0.5625, 0.5625, 0.1875])


def test_bilinear_needs_square_4d():
    with pytest.raises(NetError, match="bilinear"):
        draw('type: "bilinear"', (2, 3, 4))


def test_unknown_filler_names_the_known_ones():
    with pytest.raises(NetError, match=r"unknown filler type .xavior.*xavier"):
        draw('type: "xavior"')


def test_same_seed_same_values():
    np.testing.assert_array_equal(draw('type: "xavier"', seed=3), draw('type: "xavier"', seed=3))
