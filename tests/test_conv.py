"""conv1x1 and PointwiseConv against the float64 reference, on every ISA the machine supports."""

import os
import subprocess
import sys

import numpy as np
import pytest

import pwcpu
from pwcpu import reference
from helpers import check_conv, randn

CHANNELS = [1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 255, 257, 1000]
ACTIVATION_NAMES = list(pwcpu.ACTIVATIONS)


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("k", CHANNELS)
def test_channel_counts(isa, rng, c, k):
    # Small images for wide layers keep the sweep fast; 3 x 5 = 15 pixels is a partial tile for every MR.
    n, h, w = (1, 3, 5) if c * k > 20_000 else (2, 4, 7)
    x, weight, bias = randn(rng, n, h, w, c), randn(rng, k, c), randn(rng, k)
    check_conv(pwcpu.conv1x1(x, weight, bias), x, weight, bias, context=f"{isa} c={c} k={k}")


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("hw", [(1, 1), (1, 13), (7, 1), (5, 11), (17, 3), (29, 31)])
@pytest.mark.parametrize("stride", [1, 2, 3, (1, 2), (3, 1)])
@pytest.mark.parametrize("padding", [0, 1, (0, 2)])
def test_geometry(isa, rng, n, hw, stride, padding):
    c, k = 19, 37
    x, weight, bias = randn(rng, n, *hw, c), randn(rng, k, c), randn(rng, k)
    y = pwcpu.conv1x1(x, weight, bias, stride=stride, padding=padding)
    check_conv(y, x, weight, bias, stride=stride, padding=padding)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_epilogue(isa, rng, activation, with_bias, with_residual):
    x, weight = randn(rng, 2, 6, 5, 45), randn(rng, 70, 45) * 0.3
    bias = randn(rng, 70) if with_bias else None
    residual = randn(rng, 2, 6, 5, 70) if with_residual else None
    y = pwcpu.conv1x1(x, weight, bias, activation=activation, residual=residual)
    check_conv(y, x, weight, bias, activation=activation, residual=residual)


@pytest.mark.parametrize("groups,c,k", [(2, 4, 6), (3, 24, 24), (4, 64, 32), (8, 240, 240), (5, 5, 35), (2, 2, 2), (2, 10, 72)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_groups(isa, rng, groups, c, k, activation):
    x, weight, bias = randn(rng, 2, 5, 7, c), randn(rng, k, c // groups), randn(rng, k)
    residual = randn(rng, 2, 3, 5, k)
    y = pwcpu.conv1x1(x, weight, bias, groups=groups, stride=2, padding=(0, 1), activation=activation,
                      residual=residual)
    check_conv(y, x, weight, bias, groups=groups, stride=2, padding=(0, 1), activation=activation,
               residual=residual)


@pytest.mark.parametrize("c,k", [(1024, 256), (2048, 40), (3000, 33), (1500, 3), (9000, 20), (20000, 5)])
def test_deep_reduction(isa, rng, c, k):
    """Deep channel counts are split into several K blocks (from C of a few thousand, by the cache
    sizes); residual and activation come out right, also when out is the residual."""
    x, weight, bias = randn(rng, 1, 5, 6, c), randn(rng, k, c), randn(rng, k)
    residual = randn(rng, 1, 5, 6, k)
    y = pwcpu.conv1x1(x, weight, bias, residual=residual, activation="silu")
    check_conv(y, x, weight, bias, residual=residual, activation="silu")
    out = residual.copy()
    pwcpu.conv1x1(x, weight, bias, residual=out, out=out, activation="relu")
    check_conv(out, x, weight, bias, residual=residual, activation="relu")


def test_large_image(isa, rng):
    x, weight, bias = randn(rng, 1, 56, 57, 24), randn(rng, 144, 24), randn(rng, 144)
    check_conv(pwcpu.conv1x1(x, weight, bias, activation="relu6"), x, weight, bias, activation="relu6")


def test_weight_in_pytorch_layout(isa, rng):
    x, weight = randn(rng, 1, 4, 4, 10), randn(rng, 12, 10, 1, 1)
    check_conv(pwcpu.conv1x1(x, weight), x, weight[:, :, 0, 0])


def test_out_is_channel_slice_of_larger_buffer(isa, rng):
    """Writing into a slice of a concatenation buffer leaves every other channel untouched."""
    x, weight, bias = randn(rng, 2, 5, 6, 33), randn(rng, 20, 33), randn(rng, 20)
    buffer = randn(rng, 2, 5, 6, 50)
    before = buffer.copy()
    result = pwcpu.conv1x1(x, weight, bias, activation="relu", out=buffer[..., 17:37])
    assert result.base is buffer or np.shares_memory(result, buffer)
    check_conv(buffer[..., 17:37], x, weight, bias, activation="relu")
    np.testing.assert_array_equal(buffer[..., :17], before[..., :17])
    np.testing.assert_array_equal(buffer[..., 37:], before[..., 37:])


def test_out_with_free_strides(isa, rng):
    x, weight = randn(rng, 3, 4, 5, 9), randn(rng, 8, 9)
    big = np.zeros((3, 8, 10, 8), np.float32)
    out = big[:, ::2, ::-2, :]
    assert pwcpu.conv1x1(x, weight, out=out) is out
    check_conv(out, x, weight)
    assert np.all(big[:, 1::2] == 0)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_out_is_residual(isa, rng, activation):
    x, weight, bias = randn(rng, 2, 7, 3, 40), randn(rng, 48, 40), randn(rng, 48)
    accumulator = randn(rng, 2, 7, 3, 48)
    residual = accumulator.copy()
    y = pwcpu.conv1x1(x, weight, bias, residual=accumulator, out=accumulator, activation=activation)
    assert y is accumulator
    check_conv(y, x, weight, bias, residual=residual, activation=activation)


def test_input_views_are_read_in_place(isa, rng):
    big = randn(rng, 3, 20, 21, 40)
    weight, bias = randn(rng, 17, 13), randn(rng, 17)
    views = {
        "crop": big[1:, 2:15, 3:19, 5:18],
        "strided": big[::2, ::3, ::2, 20:33],
        "negative": big[::-1, ::-2, ::-1, 27:14:-1][..., ::-1],
        "channel slice": big[..., :13],
    }
    for name, x in views.items():
        check_conv(pwcpu.conv1x1(x, weight, bias, stride=(2, 1), padding=1), x, weight, bias, stride=(2, 1),
                   padding=1, context=name)


def test_non_contiguous_channels_are_copied(isa, rng):
    x = randn(rng, 2, 5, 5, 30)[..., ::3]
    weight = randn(rng, 6, 10)
    check_conv(pwcpu.conv1x1(x, weight), x, weight)
    channels_first = np.moveaxis(randn(rng, 2, 10, 5, 5), 1, -1)
    check_conv(pwcpu.conv1x1(channels_first, weight), channels_first, weight)
    reversed_channels = randn(rng, 2, 3, 7, 10)[..., ::-1]
    check_conv(pwcpu.conv1x1(reversed_channels, weight), reversed_channels, weight)
    wide_rows = np.moveaxis(randn(rng, 1, 10, 2, 900), 1, -1)  # copied a piece of each row at a time
    check_conv(pwcpu.conv1x1(wide_rows, weight), wide_rows, weight)
    for planes in (1, 2, 3, 4):  # NCHW images of a few channels: interleaved whole
        image = np.moveaxis(randn(rng, 2, planes, 3, 11), 1, -1)
        w_planes = randn(rng, 5, planes)
        check_conv(pwcpu.conv1x1(image, w_planes), image, w_planes, context=f"{planes} planes")


def test_strided_weight_views(isa, rng):
    x = randn(rng, 1, 4, 4, 9)
    weight = randn(rng, 40, 30)[::2, 3:30:3]
    check_conv(pwcpu.conv1x1(x, weight), x, weight)
    weight_t = np.ascontiguousarray(randn(rng, 9, 20)).T
    check_conv(pwcpu.conv1x1(x, weight_t), x, weight_t)


@pytest.mark.parametrize("shape,k", [((0, 3, 3, 4), 5), ((2, 0, 3, 4), 5), ((2, 3, 0, 4), 5), ((2, 3, 3, 4), 0)])
def test_zero_size(isa, shape, k):
    x = np.ones(shape, np.float32)
    y = pwcpu.conv1x1(x, np.ones((k, 4), np.float32))
    assert y.shape == shape[:3] + (k,) and y.dtype == np.float32


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_zero_channels_give_bias_and_activation(isa, rng, activation):
    x = np.ones((2, 3, 4, 0), np.float32)
    bias, residual = randn(rng, 5), randn(rng, 2, 3, 4, 5)
    y = pwcpu.conv1x1(x, np.ones((5, 0), np.float32), bias, activation=activation, residual=residual)
    check_conv(y, x, np.ones((5, 0), np.float32), bias, activation=activation, residual=residual)


def test_padding_only_output(isa, rng):
    """Every output of a 0x0 input with padding 1 is a border output: activation(bias)."""
    x, weight, bias = randn(rng, 1, 0, 0, 3), randn(rng, 4, 3), randn(rng, 4)
    y = pwcpu.conv1x1(x, weight, bias, padding=1, activation="sigmoid")
    assert y.shape == (1, 2, 2, 4)
    check_conv(y, x, weight, bias, padding=1, activation="sigmoid")


# Threads split the work into chunks along the pixels (few weights) or along the output channels
# (weights beyond L2, as in the deep layer), for NHWC and NCHW.
@pytest.mark.parametrize("shape,k", [((2, 17, 19, 96), 136), ((1, 3, 37, 2048), 1000)])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_result_does_not_depend_on_thread_count(isa, rng, shape, k, layout):
    x, weight, bias = randn(rng, *shape), randn(rng, k, shape[3]), randn(rng, k)
    if layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    results = []
    for threads in (1, 2, 3):
        with pwcpu.num_threads(threads):
            results.append(pwcpu.conv1x1(x, weight, bias, activation="gelu", layout=layout))
    check_conv(results[0], x, weight, bias, activation="gelu", layout=layout)
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_denormals_are_flushed_and_state_restored(isa, rng):
    import ctypes  # noqa: F401  (the check below reads the FP state through NumPy)

    tiny = np.float32(1e-39)  # a float32 denormal
    x = np.full((1, 3, 3, 8), tiny, np.float32)
    # Against a large weight a denormal input would give a normal product (1e-29): all zeros
    # show the inputs were read as zero (DAZ), not merely tiny results flushed (FTZ).
    y = pwcpu.conv1x1(x, np.full((4, 8), 1e10, np.float32))
    assert np.all(y == 0)
    # And tiny products of normal numbers are flushed to zero on the way out.
    y = pwcpu.conv1x1(np.full((1, 3, 3, 8), 1e-20, np.float32), np.full((4, 8), 1e-19, np.float32))
    assert np.all(y == 0)
    # The caller's floating-point state is restored: denormals still work in NumPy afterwards.
    assert np.float32(1e-38) / np.float32(100) != 0


def test_nan_and_inf_propagate(isa, rng):
    x, weight = randn(rng, 1, 3, 3, 20), randn(rng, 9, 20)
    x[0, 1, 1, 5] = np.nan
    x[0, 2, 2, 3] = np.inf
    for activation in ACTIVATION_NAMES:
        y = pwcpu.conv1x1(x, weight, activation=activation)
        assert np.all(np.isnan(y[0, 1, 1])), activation
        assert not np.isnan(y[0, 0]).any(), activation


def test_activations_over_the_whole_float_range(isa):
    """Each nonlinear activation on values from the smallest to the largest float32, through an
    identity weight (so z = x exactly), within the stated bound of the reference, and the limits
    PyTorch gives at the extremes: silu(-inf) is NaN, sigmoid(-inf) 0, gelu(+inf) inf."""
    magnitudes = np.geomspace(1e-30, 3e38, 2000)
    z = np.concatenate([-magnitudes, [0.0], magnitudes, np.linspace(-100, 100, 4001)]).astype(np.float32)
    for activation in sorted(set(ACTIVATION_NAMES) - {None, "relu", "relu6"}):
        y = pwcpu.pointwise(z[:, None], np.ones((1, 1), np.float32), activation=activation)[:, 0]
        with np.errstate(all="ignore"):
            want = reference.ACTIVATION_FUNCTIONS[activation](z.astype(np.float64))
        error = np.abs(y - want)
        assert (error <= 4e-7 * (np.abs(z) + 1.0)).all(), (activation, z[error.argmax()], y[error.argmax()])
    limits = pwcpu.pointwise(np.array([[-np.inf], [np.inf]], np.float32), np.ones((1, 1), np.float32),
                             activation="silu")[:, 0]
    assert np.isnan(limits[0]) and limits[1] == np.inf
    edges = np.array([[-np.inf], [np.inf]], np.float32)
    np.testing.assert_array_equal(pwcpu.pointwise(edges, np.ones((1, 1), np.float32), activation="sigmoid")[:, 0], [0, 1])
    np.testing.assert_array_equal(pwcpu.pointwise(edges, np.ones((1, 1), np.float32), activation="gelu")[1:, 0], [np.inf])


class TestPointwiseConv:
    def test_matches_conv1x1(self, isa, rng):
        weight, bias = randn(rng, 70, 33), randn(rng, 70)
        layer = pwcpu.PointwiseConv(weight, bias, stride=2, padding=1, activation="hardswish")
        x, residual = randn(rng, 2, 9, 8, 33), randn(rng, 2, 6, 5, 70)
        y = layer(x, residual=residual)
        check_conv(y, x, weight, bias, stride=2, padding=1, activation="hardswish", residual=residual)
        np.testing.assert_array_equal(
            y, pwcpu.conv1x1(x, weight, bias, stride=2, padding=1, activation="hardswish", residual=residual)
        )
        out = np.empty_like(y)
        assert layer(x, residual=residual, out=out) is out

    def test_attributes(self, rng):
        weight = randn(rng, 12, 4, 1, 1)
        layer = pwcpu.PointwiseConv(weight, None, stride=(1, 2), padding=3, groups=2, activation="silu")
        assert (layer.in_channels, layer.out_channels) == (8, 12)
        assert (layer.stride, layer.padding, layer.groups, layer.activation) == ((1, 2), (3, 3), 2, "silu")
        assert layer.weight.shape == (12, 4) and layer.bias is None
        assert not layer.weight.flags.writeable
        assert "PointwiseConv(in_channels=8" in repr(layer)

    def test_owns_its_weights(self, rng):
        weight, bias = randn(rng, 6, 5), randn(rng, 6)
        layer = pwcpu.PointwiseConv(weight, bias)
        x = randn(rng, 1, 2, 2, 5)
        expected = layer(x)
        weight[:] = 0
        bias[:] = 0
        np.testing.assert_array_equal(layer(x), expected)

    def test_pickle(self, rng):
        import pickle

        layer = pwcpu.PointwiseConv(randn(rng, 10, 6), randn(rng, 10), stride=2, groups=2, activation="gelu")
        clone = pickle.loads(pickle.dumps(layer))
        x = randn(rng, 1, 5, 5, 12)
        np.testing.assert_array_equal(clone(x), layer(x))
        assert (clone.stride, clone.groups, clone.activation) == (layer.stride, layer.groups, layer.activation)

    def test_repacks_when_isa_changes(self, rng):
        from pwcpu import _core

        weight = randn(rng, 40, 16)
        x = randn(rng, 1, 3, 3, 16)
        layer = pwcpu.PointwiseConv(weight)
        try:
            for name in _core.runtime_info()["supported_isas"]:
                _core.select_isa(name)
                check_conv(layer(x), x, weight, context=name)
                info = _core.runtime_info()  # an extension ISA (avx512vnni, avx512bf16) has no fp32 kernels of its own
                assert layer.kernel.endswith("_" + info["isa"]) and name in (info["isa"], info["bf16_isa"], info["int8_isa"])
        finally:
            _core.select_isa("auto")


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("k", [48, 37])  # rows of whole cache lines, and rows with a masked tail
def test_large_outputs_bypass_the_caches(isa, rng, layout, k):
    """Outputs from runtime_info()['stream_store_min_bytes'] on are written with non-temporal
    stores wherever a whole aligned vector allows: pwcpu's own (cache-line aligned) output, a
    NumPy out= (16 bytes off a cache line) and out is residual, with an activation."""
    pixels = pwcpu.runtime_info()["stream_store_min_bytes"] // (4 * k) + 1
    h, w = -(-pixels // 64), 64
    c = 5
    shape = (1, h, w, c) if layout == "NHWC" else (1, c, h, w)
    out_shape = (1, h, w, k) if layout == "NHWC" else (1, k, h, w)
    x, weight, bias = randn(rng, *shape), randn(rng, k, c), randn(rng, k)
    layer = pwcpu.PointwiseConv(weight, bias, layout=layout, activation="relu")
    streamed = pwcpu.runtime_info()["streamed_output_calls"]
    layer(x[:, :, :1] if layout == "NHWC" else x[..., :1])  # a small output stays in the caches
    assert pwcpu.runtime_info()["streamed_output_calls"] == streamed
    own = layer(x)
    assert pwcpu.runtime_info()["streamed_output_calls"] == streamed + 1
    assert own.ctypes.data % 64 == 0
    check_conv(own, x, weight, bias, layout=layout, activation="relu")
    numpy_out = np.empty(out_shape, np.float32)
    assert layer(x, out=numpy_out) is numpy_out
    np.testing.assert_array_equal(numpy_out, own)
    accumulator = randn(rng, *out_shape)
    residual = accumulator.copy()
    assert layer(x, residual=accumulator, out=accumulator) is accumulator
    check_conv(accumulator, x, weight, bias, layout=layout, activation="relu", residual=residual)


def test_outputs_reuse_the_last_freed_blocks_of_several_sizes(rng):
    """Layers called in turn free and ask for outputs of a few sizes: pwcpu keeps the last few
    blocks it freed, so every output of a size freed before is served from them, not only one
    of the last size."""
    small = pwcpu.PointwiseConv(randn(rng, 64, 16))
    large = pwcpu.PointwiseConv(randn(rng, 256, 16))
    x = randn(rng, 1, 64, 64, 16)  # outputs of 1 and 4 MiB
    small(x), large(x)
    reused = pwcpu.runtime_info()["reused_output_buffers"]
    for _ in range(4):
        a = small(x)
        b = large(x)
        assert a.ctypes.data != b.ctypes.data
        del a, b  # freed: large's block last, small's before it
    assert pwcpu.runtime_info()["reused_output_buffers"] == reused + 8


# (h, w) = (3, 11): the rows copied a band at a time; (7, 7) with K = 300: weights beyond a block of
# panels, the rows copied up front; (24, 24): rows too many to copy within L2, read in place (in
# tiles of half the rows by kernels of 8 rows or more) or, by those kernels with K = 600, in split
# K blocks whose panels all share L2, the rows copied a band at a time (K = 2100 has too many
# panels for that, on L2s of up to 2 MiB).
@pytest.mark.parametrize("h,w,c,stride,k", [(3, 11, 1024, 1, 40), (3, 11, 1024, 2, 33), (3, 11, 2048, 1, 7),
                                            (3, 11, 3072, 1, 17), (7, 7, 2048, 1, 300), (24, 24, 1024, 1, 600),
                                            (24, 24, 1024, 1, 2100)])
def test_channels_a_multiple_of_4_kib_are_copied_or_take_shorter_tiles(isa, rng, h, w, c, stride, k):
    """Pixel rows 4 KiB apart fall in one L1 set; those layers copy their rows to a buffer that does
    not alias, or run half-height tiles, tails included."""
    x, weight, bias = randn(rng, 2, h, w, c), randn(rng, k, c), randn(rng, k)
    y = pwcpu.conv1x1(x, weight, bias, stride=stride, activation="relu")
    check_conv(y, x, weight, bias, stride=stride, activation="relu")


def _timed_calls():
    return np.array(pwcpu.runtime_info()["timed_choice_calls"])


def _calls_by_way(layer, x, calls=9):
    """The results of `calls` calls, checked equal bit for bit, and the way each call ran
    (-1 where the layer timed nothing)."""
    results, ways = [], []
    for _ in range(calls):
        before = _timed_calls()
        results.append(layer(x))
        ran = _timed_calls() - before
        assert ran.sum() in (0, 1)
        ways.append(int(np.argmax(ran)) if ran.sum() else -1)
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])
    return results[0], ways


def _check_timed_ways(ways):
    """The first calls take the n ways in turn, twice over; later ones keep one."""
    n = max(ways) + 1
    assert ways[:2 * n] == [i % n for i in range(2 * n)]
    assert len(set(ways[2 * n:])) == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_that_alias_time_both_ways_and_keep_the_faster(isa, rng, threads):
    """A layer whose rows alias, too many to copy within L2, with kernels of 8 rows or more and
    several blocks of panels (1024 rows of C = 1024, K = 384, on L2s of 0.4-3 MiB) may split its
    reduction over copied rows or run half tiles in place: its first calls take the two in turn
    (two each), later ones keep one. Every call gives the same values, bit for bit."""
    pwcpu.set_num_threads(threads)
    x, weight, bias = randn(rng, 1, 4, 256, 1024), randn(rng, 384, 1024), randn(rng, 384)
    layer = pwcpu.PointwiseConv(weight, bias, activation="relu")
    y, ways = _calls_by_way(layer, x)
    check_conv(y, x, weight, bias, activation="relu")
    mr = _kernel_shape(layer.kernel)[0]
    l2 = pwcpu.runtime_info()["l2_bytes"]
    if mr >= 8 and 400 << 10 <= l2 <= 3 << 20:
        assert -1 not in ways and max(ways) >= 1
    if ways != [-1] * len(ways):
        _check_timed_ways(ways)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_time_splitting_rows_against_panels(isa, rng, threads):
    """Where the partition's model splits the panels among threads (196 rows, K = 576) and
    splitting the rows is as balanced, a layer times both on its first calls; one thread has
    nothing to time. Every call gives the same values, bit for bit."""
    pwcpu.set_num_threads(threads)
    x, weight = randn(rng, 1, 14, 14, 96), randn(rng, 576, 96)
    layer = pwcpu.PointwiseConv(weight)
    y, ways = _calls_by_way(layer, x)
    check_conv(y, x, weight)
    if threads == 1 or pwcpu.get_num_threads() == 1:
        assert ways == [-1] * len(ways)
    else:
        _check_timed_ways(ways)
        assert max(ways) == 1


def test_layer_timing_can_be_switched_off():
    """PWCPU_LAYER_TIMING=0: such layers always run their first way (the partition's model,
    the reduction split over copied rows)."""
    code = ("import numpy as np, pwcpu\n"
            "pwcpu.set_num_threads(1)\n"
            "x = np.ones((1, 4, 256, 1024), np.float32); w = np.ones((384, 1024), np.float32)\n"
            "layer = pwcpu.PointwiseConv(w)\n"
            "for _ in range(6): assert (layer(x) == 1024).all()\n"
            "pwcpu.set_num_threads(2)\n"
            "layer = pwcpu.PointwiseConv(np.ones((576, 96), np.float32))\n"
            "for _ in range(6): assert (layer(np.ones((1, 14, 14, 96), np.float32)) == 96).all()\n"
            "print(pwcpu.get_num_threads(), *pwcpu.runtime_info()['timed_choice_calls'])\n")
    env = dict(os.environ, PWCPU_LAYER_TIMING="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    threads, *calls = map(int, out.stdout.split())
    assert calls[1:] == [0, 0, 0]
    # (The second layer's partitions differ wherever there are two threads; the first layer's
    # rows alias on 14-row kernels only.)
    assert calls[0] in ((6, 12) if threads == 2 else (0, 6))


def _kernel_shape(name):
    """(mr, nr) from a kernel name, [bf16_|int8_]f32_gemm_bias_act_<mr>x<nr>_<isa>."""
    mr, nr = name.rsplit("_", 2)[-2].split("x")
    return int(mr), int(nr)


@pytest.mark.parametrize("precision,kernel_list",
                         [("fp32", "gemm_kernels"), ("bf16", "bf16_gemm_kernels"), ("int8", "int8_gemm_kernels")])
def test_every_gemm_kernel_over_its_tile_shapes(isa, rng, precision, kernel_list):
    """Kernel-level sweep: each of the ISA's GEMM kernels (float weights, bfloat16 weights for
    precision "bf16", int8 ones for "int8"), found through the layer widths that select it, over
    every row count 1..MR+1, output widths around its NR (full panels and tails), reductions with
    tails (odd ones for int8's pairs), bias and an activation, against the float64 reference (on
    the inputs as the precision reads them)."""
    info = pwcpu.runtime_info()
    kernels = info[kernel_list]
    family_isa = {"fp32": info["isa"], "bf16": info["bf16_isa"], "int8": info["int8_isa"]}[precision]
    assert len(kernels) >= (1 if precision == "int8" else 2)
    assert all(k.endswith("_" + family_isa) for k in kernels)
    widths = {}
    for k in range(1, 3 * max(_kernel_shape(name)[1] for name in kernels) + 1):
        widths.setdefault(pwcpu.PointwiseConv(np.zeros((k, 64), np.float32), precision=precision).kernel, []).append(k)
    assert set(widths) == set(kernels), f"kernels no layer width selects: {set(kernels) - set(widths)}"
    for name, ks in widths.items():
        mr, nr = _kernel_shape(name)
        chosen = sorted({ks[0], ks[-1]} | {k for k in ks if k % nr in (0, 1, nr - 1)})
        for k in chosen:
            for c in (1, 5, 33, 70):
                weight, bias = randn(rng, k, c), randn(rng, k)
                layer = pwcpu.PointwiseConv(weight, bias, activation="relu", precision=precision)
                if layer.kernel != name:  # int8 on AMX: layers of few channels take VNNI's kernels
                    assert family_isa == "avx512amx" and c < 22 and layer.kernel.endswith("_avx512vnni"), layer.kernel
                    continue
                for m in range(1, mr + 2):
                    x = randn(rng, 1, 1, m, c)
                    check_conv(layer(x), x, weight, bias, activation="relu", precision=precision,
                               context=f"{name} m={m} k={k} c={c}")


# The plain forms of the kernels that also come in a shuffled form (see TileForm in
# f32_gemm_tile.inl): the tables' figures, which the tests use, pick the plain ones.
PLAIN_TWINS_OF_SHUFFLED = ("f32_gemm_bias_act_14x16_avx512", "f32_gemm_bias_act_12x8_avx2")


def test_shuffled_kernels_over_their_tile_shapes():
    """The shuffled forms, which only the timing on some CPUs picks: in a process that skips the
    plain forms (PWCPU_SKIP_KERNELS), every x86 ISA lists its shuffled kernel, and the fp32 kernel
    sweep above passes with it on every ISA."""
    env = dict(os.environ, PWCPU_SKIP_KERNELS=",".join(PLAIN_TWINS_OF_SHUFFLED))
    listing = """
import pwcpu
from pwcpu import _core
for isa in pwcpu.runtime_info()["supported_isas"]:
    _core.select_isa(isa)
    print(isa, " ".join(pwcpu.runtime_info()["gemm_kernels"]))
"""
    listed = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    for line in listed.stdout.splitlines():
        isa, *kernels = line.split()
        assert (isa == "scalar") != any("_shuffled_" in k for k in kernels), line
        assert not set(kernels) & set(PLAIN_TWINS_OF_SHUFFLED), line
    sweep = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                            "test_every_gemm_kernel_over_its_tile_shapes and fp32"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert sweep.returncode == 0 and " passed" in sweep.stdout, sweep.stdout[-3000:]
