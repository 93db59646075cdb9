"""precision="int8": dynamic quantization, float32 in and out.

Weights are quantized once per output channel (symmetric int8), each pixel's channels as they are
read (int8 with the pixel's own scale and zero point), the products summed exactly in int32. The
reference (pwcpu.reference.quantize_int8_*) quantizes the same way in float32, so every ISA path is
held to the few roundings of dequantization on top of the exact integer sums; the error against the
float32 result is checked separately, as what a user gives up.
"""

import numpy as np
import pytest

import pwcpu
from pwcpu import _core, reference

from helpers import assert_within, check_conv, pointwise_bound, randn


def test_reference_quantization_of_rows():
    rng = np.random.default_rng(1)
    x = np.concatenate([randn(rng, 6, 37) * 3, np.zeros((1, 37), np.float32), np.abs(randn(rng, 1, 37)) + 1], axis=0)
    values, scale = reference.quantize_int8_rows(x)
    assert scale.shape == (8, 1) and scale[6, 0] == 0 and np.all(values[6] == 0)
    for row, v, s in zip(x, values, scale[:, 0]):
        assert np.all(v == np.rint(v)) and v.max() - v.min() <= 255  # 256 levels at most
        if s > 0:
            assert np.all(np.abs(v * s - row) <= 0.5001 * s)  # each value to within half a step
    # 0 is exact (a zero point is an integer): the all-positive row starts from 0, not its minimum.
    assert values[7].min() >= 0 and np.isclose(scale[7, 0], x[7].max() / 255)
    # Two groups quantize on their own.
    both, scales = reference.quantize_int8_rows(np.concatenate([x[:1], 100 * x[:1]], axis=1), groups=2)
    np.testing.assert_allclose(scales[0], [scale[0, 0], 100 * scale[0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(both[0, :37], values[0])


def test_reference_quantization_of_weights():
    w = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [2.0, 1.0, -0.004]], np.float32)
    values, scale = reference.quantize_int8_weights(w)
    np.testing.assert_array_equal(values, [[64, -127, 32], [0, 0, 0], [127, 64, 0]])
    np.testing.assert_array_equal(scale, np.array([1.0, 0.0, 2.0], np.float32) / np.float32(127))


@pytest.mark.parametrize("c", [1, 2, 7, 16, 37, 300])
@pytest.mark.parametrize("k", [1, 5, 16, 33])
def test_conv1x1_int8_against_the_quantized_reference(isa, rng, c, k):
    x, weight, bias, residual = randn(rng, 2, 5, 7, c), randn(rng, k, c), randn(rng, k), randn(rng, 2, 5, 7, k)
    y = pwcpu.conv1x1(x, weight, bias, activation="silu", residual=residual, precision="int8")
    check_conv(y, x, weight, bias, activation="silu", residual=residual, precision="int8", context=f"{isa} c={c} k={k}")


def test_error_against_float32_is_that_of_8_bits(isa, rng):
    """What a user gives up: on N(0, 1) data over 256 channels, about 1 % of the output's scale."""
    x, weight, bias = randn(rng, 1, 8, 8, 256), randn(rng, 64, 256), randn(rng, 64)
    y = pwcpu.conv1x1(x, weight, bias, precision="int8")
    exact = reference.conv1x1(x, weight, bias)
    relative = np.abs(y - exact).max() / np.abs(exact).max()
    assert 1e-4 < relative < 0.02, relative


def test_stride_padding_groups_and_views(isa, rng):
    big = randn(rng, 2, 11, 13, 24)
    x = big[:, 1:10:2, ::-1, 2:22]  # strided, reversed, a channel slice: read in place
    weight, bias = randn(rng, 12, 5), randn(rng, 12)  # 4 groups of 5 channels: odd, padded to pairs
    options = dict(stride=2, padding=1, groups=4, activation="relu")
    y = pwcpu.conv1x1(x, weight, bias, precision="int8", **options)
    check_conv(y, x, weight, bias, precision="int8", **options)
    # Padding pixels read zeros: bias and activation only.
    np.testing.assert_array_equal(y[:, 0], np.broadcast_to(np.maximum(bias, 0), y[:, 0].shape))


def test_each_group_has_its_own_scale(isa, rng):
    """A group of large values next to one of small values: quantized together, the small group
    would round to nothing; each group's own scale keeps it."""
    x = np.concatenate([1000 * randn(rng, 1, 3, 3, 8), randn(rng, 1, 3, 3, 8)], axis=-1)
    weight = randn(rng, 6, 8)
    y = pwcpu.conv1x1(x, weight, groups=2, precision="int8")
    exact = reference.conv1x1(x, weight, groups=2)
    small = exact[..., 3:]
    assert np.abs(y[..., 3:] - small).max() < 0.05 * np.abs(small).max()


def test_pointwise_and_the_packed_layer(isa, rng):
    x, weight, bias = randn(rng, 3, 4, 6, 40), randn(rng, 24, 40), randn(rng, 24)
    y = pwcpu.pointwise(x, weight, bias, activation="relu6", precision="int8")
    expected, tolerance = pointwise_bound(x, weight, bias, activation="relu6", precision="int8")
    assert_within(y, expected, tolerance, isa)
    layer = pwcpu.PointwiseConv(weight, bias, activation="relu6", precision="int8")
    assert layer.precision == "int8" and layer.kernel.startswith("int8_f32_") and "_gemm_bias_act_" in layer.kernel
    np.testing.assert_array_equal(layer(x), y)
    out = np.empty_like(y)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, y)
    assert "precision='int8'" in repr(layer)


def test_results_do_not_depend_on_threads_or_blocking(rng):
    """Rows are quantized whole, whichever thread or block of panels reads them, and the integer
    sums are exact: 1 and 2 threads, and any reduction block setting, agree bitwise."""
    x, weight, bias = randn(rng, 1, 16, 16, 96), randn(rng, 200, 96), randn(rng, 200)
    layer = pwcpu.PointwiseConv(weight, bias, activation="gelu", precision="int8")
    with pwcpu.num_threads(1):
        one = layer(x)
    with pwcpu.num_threads(2):
        two = layer(x)
    _core.set_max_reduction_block(8)
    try:
        blocked = layer(x)
    finally:
        _core.set_max_reduction_block(0)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, blocked)


def test_weights_of_several_cache_blocks(isa, rng):
    """Deep and wide enough that a thread's panels take several L2 blocks: each thread's rows are
    then quantized once, up front, for all of them (with groups: each group's scales in turn)."""
    x, weight, bias = randn(rng, 1, 3, 5, 4096), randn(rng, 96, 2048), randn(rng, 96)
    for threads in (1, 2):
        with pwcpu.num_threads(threads):
            y = pwcpu.conv1x1(x, weight, bias, groups=2, precision="int8")
        check_conv(y, x, weight, bias, groups=2, precision="int8", context=f"{isa} {threads} threads")


def test_a_pixel_with_nan_or_infinity_gives_nan_and_leaves_the_others(isa, rng):
    x, weight, bias = randn(rng, 1, 2, 3, 20), randn(rng, 7, 20), randn(rng, 7)
    x[0, 0, 1, 4] = np.nan
    x[0, 1, 2, 0] = np.inf
    y = pwcpu.conv1x1(x, weight, bias, precision="int8")
    assert np.isnan(y[0, 0, 1]).all() and np.isnan(y[0, 1, 2]).all()
    finite = np.isfinite(x).all(axis=-1)
    check_conv(y[finite][None, None], x[finite][None, None], weight, bias, precision="int8")


def test_rows_of_zeros_give_the_bias(isa, rng):
    weight, bias = randn(rng, 9, 12), randn(rng, 9)
    y = pwcpu.conv1x1(np.zeros((1, 2, 2, 12), np.float32), weight, bias, precision="int8")
    np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))


def test_inverted_residual_with_int8_stages(rng):
    """The fused block's 1x1 stages run at the block's precision: bitwise the stages in turn."""
    c, e, k = 16, 64, 16
    x = randn(rng, 1, 12, 12, c)
    expand_w, expand_b, dw_w, dw_b = randn(rng, e, c), randn(rng, e), randn(rng, e, 3, 3), randn(rng, e)
    project_w, project_b = randn(rng, k, e), randn(rng, k)
    block = pwcpu.InvertedResidual(expand_w, expand_b, dw_w, dw_b, project_w, project_b, precision="int8")
    in_turn = pwcpu.conv1x1(x, expand_w, expand_b, activation="relu6", precision="int8")
    in_turn = pwcpu.depthwise_conv2d(in_turn, dw_w, dw_b, padding=1, activation="relu6")
    in_turn = pwcpu.conv1x1(in_turn, project_w, project_b, residual=x, precision="int8")
    np.testing.assert_array_equal(block(x), in_turn)


def test_errors(rng):
    x, weight = randn(rng, 1, 3, 4, 8), randn(rng, 4, 8)
    with pytest.raises(ValueError, match="NHWC"):
        pwcpu.conv1x1(x.transpose(0, 3, 1, 2), weight, layout="NCHW", precision="int8")
    bad = weight.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="finite weights"):
        pwcpu.PointwiseConv(bad, precision="int8")
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite weights"):
        pwcpu.conv1x1(x, bad, precision="int8")
    with pytest.raises(ValueError, match="65536"):
        pwcpu.PointwiseConv(np.ones((1, 65537), np.float32), precision="int8")
    with pytest.raises(ValueError, match="precision"):
        pwcpu.conv1x1(x, weight, precision="int4")


@pytest.mark.parametrize("c,groups,deep", [(16, 1, False), (21, 1, False), (64, 4, False), (22, 1, True), (64, 1, True)])
def test_layers_of_few_channels_on_amx_take_the_vnni_kernels(rng, c, groups, deep):
    """AMX multiplies tiles 64 channels deep: a layer whose groups have fewer than 22 channels would
    mostly multiply padding, and takes VNNI's kernels instead (dynamic and static int8 alike)."""
    if pwcpu.runtime_info()["int8_isa"] != "avx512amx":
        pytest.skip("the int8 family is not AMX's here")
    suffix = "_avx512amx" if deep else "_avx512vnni"
    x, weight, bias = randn(rng, 1, 5, 7, c), randn(rng, 32, c // groups), randn(rng, 32)
    layer = pwcpu.PointwiseConv(weight, bias, groups=groups, activation="relu", precision="int8")
    assert layer.kernel.endswith(suffix), layer.kernel
    check_conv(layer(x), x, weight, bias, groups=groups, activation="relu", precision="int8")
    static = pwcpu.QuantizedPointwiseConv(rng.integers(-128, 128, (32, c // groups), dtype=np.int8), 0.02, 0,
                                          0.05, 3, 0.1, 128, groups=groups)
    assert static.kernel.endswith(suffix), static.kernel
