"""The split-reduction path of the GEMM driver (K blocks whose partial sums wait in a float32
scratch tile), forced on every ISA by a small maximum block: on its own it runs only for
reductions longer than L2 allows (thousands of channels)."""

import numpy as np
import pytest

import pwcpu
from pwcpu import _core

from helpers import check_conv, dense_bound, pointwise_bound, assert_within, randn


@pytest.fixture(params=[8, 13])
def small_blocks(request):
    _core.set_max_reduction_block(request.param)
    try:
        yield request.param
    finally:
        _core.set_max_reduction_block(0)


@pytest.mark.parametrize("c", [9, 16, 37, 100])
@pytest.mark.parametrize("k", [5, 16, 33])
@pytest.mark.parametrize("activation", [None, "relu6", "silu"])
def test_conv1x1(isa, rng, small_blocks, c, k, activation):
    x, weight, bias, residual = randn(rng, 2, 5, 7, c), randn(rng, k, c), randn(rng, k), randn(rng, 2, 5, 7, k)
    y = pwcpu.conv1x1(x, weight, bias, activation=activation, residual=residual)
    check_conv(y, x, weight, bias, activation=activation, residual=residual)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_stride_padding_groups_and_out_is_residual(isa, rng, small_blocks, layout):
    c, k, groups = 40, 24, 2
    x, weight, bias = randn(rng, 1, 9, 8, c), randn(rng, k, c // groups), randn(rng, k)
    options = dict(stride=2, padding=1, groups=groups, activation="relu")
    if layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    accumulator = randn(rng, *pwcpu.conv1x1(x, weight, bias, layout=layout, **options).shape)
    residual = accumulator.copy()
    y = pwcpu.conv1x1(x, weight, bias, layout=layout, residual=accumulator, out=accumulator, **options)
    assert y is accumulator
    check_conv(y, x, weight, bias, layout=layout, residual=residual, **options)


def test_pointwise_dense_and_block(isa, rng, small_blocks):
    x, weight, bias = randn(rng, 3, 11, 50), randn(rng, 20, 50), randn(rng, 20)
    assert_within(pwcpu.pointwise(x, weight, bias, activation="gelu"),
                  *pointwise_bound(x, weight, bias, activation="gelu"))
    x, weight = randn(rng, 1, 9, 9, 6), randn(rng, 12, 6, 3, 3)
    assert_within(pwcpu.conv2d(x, weight, padding=1, activation="silu"),
                  *dense_bound(x, weight, padding=1, activation="silu"))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_split_gives_the_unsplit_result_bitwise(isa, rng, layout, precision):
    # Partial sums are stored and reloaded exactly, and bias, residual and activation join once, at
    # the end: splitting the reduction changes no operation's order, so no bit of the result.
    c, k, groups = 100, 34, 2
    x, weight, bias = randn(rng, 2, 9, 7, c), randn(rng, k, c // groups), randn(rng, k)
    options = dict(stride=2, padding=1, groups=groups, activation="silu", layout=layout, precision=precision)
    if layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    residual = randn(rng, *pwcpu.conv1x1(x, weight, bias, **options).shape)
    unsplit = pwcpu.conv1x1(x, weight, bias, residual=residual, **options)
    for block in (8, 13, 64):
        _core.set_max_reduction_block(block)
        try:
            split = pwcpu.conv1x1(x, weight, bias, residual=residual, **options)
            in_place = residual.copy()
            pwcpu.conv1x1(x, weight, bias, residual=in_place, out=in_place, **options)
        finally:
            _core.set_max_reduction_block(0)
        np.testing.assert_array_equal(split, unsplit)
        np.testing.assert_array_equal(in_place, unsplit)


def test_thread_counts_agree(isa, rng, small_blocks):
    x, weight, bias = randn(rng, 1, 30, 30, 70), randn(rng, 48, 70), randn(rng, 48)
    results = []
    for threads in (1, 2, 3):
        pwcpu.set_num_threads(threads)
        results.append(pwcpu.conv1x1(x, weight, bias, activation="hardswish"))
    check_conv(results[0], x, weight, bias, activation="hardswish")
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])


def test_negative_block_is_an_error():
    with pytest.raises(ValueError, match="channels must be >= 0"):
        _core.set_max_reduction_block(-1)
