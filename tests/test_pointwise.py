"""pointwise(): the same operation over any leading axes, (..., C) -> (..., K)."""

import numpy as np
import pytest

import pwcpu
from helpers import assert_within, pointwise_bound, randn


def check_pointwise(actual, x, weight, bias=None, **kwargs):
    expected, tolerance = pointwise_bound(x, weight, bias, **kwargs)
    assert_within(actual, expected, tolerance, repr(kwargs))


@pytest.mark.parametrize("leading", [(), (1,), (7,), (3, 5), (2, 3, 4), (2, 1, 3, 2), (2, 2, 2, 2, 3)])
def test_leading_axes(isa, rng, leading):
    x, weight, bias = randn(rng, *leading, 21), randn(rng, 34, 21), randn(rng, 34)
    y = pwcpu.pointwise(x, weight, bias, activation="gelu")
    assert y.shape == leading + (34,)
    check_pointwise(y, x, weight, bias, activation="gelu")


def test_feed_forward_shape(isa, rng):
    x, w1, w2 = randn(rng, 2, 37, 64), randn(rng, 256, 64) * 0.1, randn(rng, 64, 256) * 0.1
    hidden = pwcpu.pointwise(x, w1, activation="gelu")
    y = pwcpu.pointwise(hidden, w2, residual=x)
    check_pointwise(y, hidden, w2, residual=x)


def test_unmergeable_views(isa, rng):
    base = randn(rng, 4, 6, 8, 10, 30)
    x = base[::2, ::-1, 1::3, ::2, 3:19]  # leading axes that do not merge: copied
    weight = randn(rng, 9, 16)
    check_pointwise(pwcpu.pointwise(x, weight), x, weight)
    out_base = np.zeros((2, 6, 3, 5, 20), np.float32)
    out = out_base[..., 5:14]
    residual = randn(rng, 2, 6, 3, 5, 9)
    assert pwcpu.pointwise(x, weight, residual=residual, out=out) is out
    check_pointwise(out, x, weight, residual=residual)
    assert np.all(out_base[..., :5] == 0) and np.all(out_base[..., 14:] == 0)


def test_out_that_cannot_be_written_in_place_is_an_error(rng):
    x, weight = randn(rng, 2, 4, 3, 5, 6), randn(rng, 3, 6)
    out = np.zeros((2, 7, 9, 10, 3), np.float32)[:, ::2, ::3, ::2]
    with pytest.raises(ValueError, match="out's leading axes"):
        pwcpu.pointwise(x, weight, out=out)
    assert np.all(out == 0)


def test_out_is_residual(isa, rng):
    x, weight = randn(rng, 10, 12), randn(rng, 12, 12)
    acc = randn(rng, 10, 12)
    residual = acc.copy()
    assert pwcpu.pointwise(x, weight, residual=acc, out=acc, activation="relu6") is acc
    check_pointwise(acc, x, weight, residual=residual, activation="relu6")


def test_matches_conv1x1_bitwise(rng):
    x, weight, bias = randn(rng, 2, 5, 6, 40), randn(rng, 50, 40), randn(rng, 50)
    np.testing.assert_array_equal(pwcpu.pointwise(x, weight, bias), pwcpu.conv1x1(x, weight, bias))


def test_zero_size(rng):
    assert pwcpu.pointwise(np.ones((0, 4), np.float32), np.ones((3, 4), np.float32)).shape == (0, 3)
    assert pwcpu.pointwise(np.ones((2, 0, 4), np.float32), np.ones((3, 4), np.float32)).shape == (2, 0, 3)
    bias = randn(rng, 3)
    y = pwcpu.pointwise(np.ones((2, 0), np.float32), np.ones((3, 0), np.float32), bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (2, 3)))
