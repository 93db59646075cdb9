"""precision="bf16": inputs and weights rounded to bfloat16, products summed in float32.

Every ISA path is held to the float32-accumulation bound on the rounded inputs (the products of two
bfloat16 values are exact in float32), and where no bfloat16 instructions exist (the float32
kernels run on the rounded operands), stronger, to the float32 path's own result on inputs that
are already bfloat16 values: the rounding is all that differs. The dot-product kernels
(vdpbf16ps) and AMX tiles (tdpbf16ps) sum each pair of products in their own order, so they meet
the bound only.
"""

import pickle

import numpy as np
import pytest

import pwcpu
from pwcpu import _core, reference

from helpers import check_conv, pointwise_bound, assert_within, randn



def bf16_values(a):
    return reference.round_to_bf16(a)


def float32_kernels():
    """Whether precision="bf16" runs the float32 kernels on rounded operands (rather than vdpbf16ps or AMX tiles)."""
    return _core.runtime_info()["bf16_gemm_kernels"][0].startswith("f32_gemm_")


def test_rounding_is_to_nearest_even_with_nan_and_overflow():
    one_ulp = 2.0**-7  # bfloat16 has 8 significand bits: 1 + 2^-7 is the next value after 1
    x = np.array([1.0, 1 + one_ulp / 2, 1 + 3 * one_ulp / 2, 1 + one_ulp / 2 + 2**-20, -1 - one_ulp / 2, 3.4e38,
                  np.inf, -np.inf, np.nan, 1e-39], np.float32)
    r = reference.round_to_bf16(x)
    expected = [1.0, 1.0, 1 + 2 * one_ulp, 1 + one_ulp, -1.0, np.inf, np.inf, -np.inf]
    np.testing.assert_array_equal(r[:8], np.array(expected, np.float32))
    assert np.isnan(r[8])
    assert r[9] != 0 and abs(r[9] - 1e-39) <= 2.0**-134  # a denormal rounds like any other value (half its ulp)
    assert np.all(r.view(np.uint32)[np.isfinite(r)] & 0xFFFF == 0)


@pytest.mark.parametrize("c", [1, 7, 16, 37, 300])
@pytest.mark.parametrize("k", [1, 5, 16, 33])
def test_conv1x1_bf16_against_the_rounded_reference(isa, rng, c, k):
    x, weight, bias, residual = randn(rng, 2, 5, 7, c), randn(rng, k, c), randn(rng, k), randn(rng, 2, 5, 7, k)
    y = pwcpu.conv1x1(x, weight, bias, activation="silu", residual=residual, precision="bf16")
    check_conv(y, x, weight, bias, activation="silu", residual=residual, precision="bf16",
               context=f"{isa} c={c} k={k}")
    # The rounding is all that differs from the float32 path: on inputs that are bfloat16 values
    # already, the float32 kernels compute the very same sums.
    same = pwcpu.conv1x1(bf16_values(x), bf16_values(weight), bias, activation="silu", residual=residual)
    if float32_kernels():
        np.testing.assert_array_equal(y, same)
    if c > 1:
        # And the rounding happens: float32 inputs give another result than the float32 path's.
        assert not np.array_equal(y, pwcpu.conv1x1(x, weight, bias, activation="silu", residual=residual))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_stride_padding_groups_and_views(isa, rng, layout):
    big = randn(rng, 2, 11, 13, 24)
    x = big[:, 1:10:2, ::-1, 2:22]  # strided, reversed, a channel slice: read in place (NHWC)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    weight, bias = randn(rng, 12, 5), randn(rng, 12)
    options = dict(stride=2, padding=1, groups=4, activation="relu", layout=layout)
    y = pwcpu.conv1x1(x, weight, bias, precision="bf16", **options)
    check_conv(y, x, weight, bias, precision="bf16", **options)
    if layout == "NCHW" or float32_kernels():  # NCHW runs the float32 kernels on rounded values
        np.testing.assert_array_equal(y, pwcpu.conv1x1(bf16_values(x), bf16_values(weight), bias, **options))


@pytest.mark.parametrize("block", [8, 13])
def test_split_reduction(isa, rng, block):
    _core.set_max_reduction_block(block)
    try:
        x, weight, bias = randn(rng, 1, 3, 9, 100), randn(rng, 33, 100), randn(rng, 33)
        y = pwcpu.conv1x1(x, weight, bias, activation="gelu", precision="bf16")
        check_conv(y, x, weight, bias, activation="gelu", precision="bf16")
    finally:
        _core.set_max_reduction_block(0)


def test_pointwise_and_the_packed_layer(isa, rng):
    x, weight, bias = randn(rng, 3, 4, 6, 40), randn(rng, 24, 40), randn(rng, 24)
    y = pwcpu.pointwise(x, weight, bias, activation="relu6", precision="bf16")
    expected, tolerance = pointwise_bound(x, weight, bias, activation="relu6", precision="bf16")
    assert_within(y, expected, tolerance, isa)
    layer = pwcpu.PointwiseConv(weight, bias, activation="relu6", precision="bf16")
    assert layer.precision == "bf16" and "precision='bf16'" in repr(layer)
    np.testing.assert_array_equal(layer(x), y)
    out = np.empty_like(y)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, y)
    # The weights the layer reports are the float32 ones it was given; only the packing is rounded.
    np.testing.assert_array_equal(layer.weight, weight)
    again = pickle.loads(pickle.dumps(layer))
    assert again.precision == "bf16"
    np.testing.assert_array_equal(again(x), y)


def test_multithreaded_results_do_not_depend_on_the_thread_count(rng):
    x, weight = randn(rng, 1, 33, 17, 64), randn(rng, 96, 64)
    results = []
    for threads in (1, 2, 3):
        with pwcpu.num_threads(threads):
            results.append(pwcpu.conv1x1(x, weight, precision="bf16"))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_bfloat16_arrays_in_and_out(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    x, weight, bias, residual = randn(rng, 2, 3, 5, 20), randn(rng, 8, 20), randn(rng, 8), randn(rng, 2, 3, 5, 8)
    xb, rb = x.astype(bf16), residual.astype(bf16)
    # The reference's rounding is ml_dtypes' rounding.
    np.testing.assert_array_equal(reference.round_to_bf16(x), xb.astype(np.float32))
    expected = pwcpu.conv1x1(xb.astype(np.float32), weight, bias, residual=rb.astype(np.float32), precision="bf16")
    # bfloat16 inputs are widened exactly; the result is float32 unless out says otherwise.
    y = pwcpu.conv1x1(xb, weight, bias, residual=rb, precision="bf16")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, expected)
    # A bfloat16 out gets the float32 result rounded to nearest even, as ml_dtypes rounds.
    out = np.empty((2, 3, 5, 8), bf16)
    assert pwcpu.conv1x1(xb, weight, bias, residual=rb, precision="bf16", out=out) is out
    np.testing.assert_array_equal(out.view(np.uint16), expected.astype(bf16).view(np.uint16))
    # The same through the packed layer and pointwise, and with float32 arithmetic.
    layer = pwcpu.PointwiseConv(weight, bias, precision="bf16")
    np.testing.assert_array_equal(layer(xb, residual=rb), expected)
    out2 = np.empty_like(out)
    layer(xb, residual=rb, out=out2)
    np.testing.assert_array_equal(out2.view(np.uint16), out.view(np.uint16))
    np.testing.assert_array_equal(pwcpu.pointwise(xb, weight, bias, residual=rb, precision="bf16"), expected)
    np.testing.assert_array_equal(pwcpu.conv1x1(xb, weight), pwcpu.conv1x1(xb.astype(np.float32), weight))
    # A bfloat16 out that is also the residual: accumulated in place.
    acc = residual.astype(bf16)
    pwcpu.conv1x1(xb, weight, bias, residual=acc, out=acc, precision="bf16")
    np.testing.assert_array_equal(acc.view(np.uint16), expected.astype(bf16).view(np.uint16))


@pytest.mark.parametrize("channels", [37, 36])  # odd: rows copied into pairs; even: pairs read in place
@pytest.mark.parametrize("view,stride,padding", [("whole", 1, 0), ("strided", 2, 1), ("channel_slice", 1, 1),
                                                  ("reversed", 1, 0)])
def test_bfloat16_x_read_as_it_is_equals_the_widened_path(isa, rng, view, stride, padding, channels):
    """Where precision "bf16" has kernels of its own (a bfloat16 dot product, AMX), a 4-D bfloat16 x
    is read as it is, without a widening copy: the same values, so the same results, on any view."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    big = randn(rng, 2, 9, 11, 80).astype(ml_dtypes.bfloat16)
    c = channels
    xb = {"whole": big[..., :c], "strided": big[:, ::2, 1::3, :c], "channel_slice": big[..., 5:5 + c],
          "reversed": big[:, ::-1, ::-1, :c]}[view]
    if view == "whole":
        xb = np.ascontiguousarray(xb)
        xb.flags.writeable = False  # read only
    weight, bias, residual_shape = randn(rng, 19, c), randn(rng, 19), None
    layer = pwcpu.PointwiseConv(weight, bias, stride=stride, padding=padding, activation="relu", precision="bf16")
    assert layer._plan.reads_bfloat16 == (not float32_kernels()), isa
    expected = layer(xb.astype(np.float32))
    residual = randn(rng, *expected.shape)
    np.testing.assert_array_equal(layer(xb), expected)
    np.testing.assert_array_equal(layer(xb, residual=residual), layer(xb.astype(np.float32), residual=residual))
    np.testing.assert_array_equal(
        pwcpu.conv1x1(xb, weight, bias, stride=stride, padding=padding, activation="relu", precision="bf16"), expected)
    # A bfloat16 out: stored rounded by the kernels where they take bfloat16, as the copy rounds.
    rounded = expected.astype(ml_dtypes.bfloat16).view(np.uint16)
    out = np.empty(expected.shape, ml_dtypes.bfloat16)
    assert layer(xb, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint16), rounded)
    wide = np.zeros(expected.shape[:3] + (2 * expected.shape[3],), ml_dtypes.bfloat16)
    assert layer(xb, out=wide[..., 1::2]) is not None  # channels strided: computed, then copied
    np.testing.assert_array_equal(wide[..., 1::2].view(np.uint16), rounded)
    assert not wide[..., ::2].view(np.uint16).any()
    reversed_out = np.empty(expected.shape, ml_dtypes.bfloat16)[:, ::-1]
    layer(xb, out=reversed_out)
    np.testing.assert_array_equal(reversed_out.view(np.uint16), rounded)


@pytest.mark.parametrize("c,groups,stride", [(36, 2, 1), (36, 2, 2), (2048, 1, 1), (1024, 1, 2)])
def test_bfloat16_x_groups_and_pixels_4_kib_apart_equal_the_widened_path(isa, rng, c, groups, stride):
    """bfloat16 rows read in place take each group's pairs from its own channels. Pixels 4 KiB apart
    (2048 channels, or 1024 at stride 2), whose rows would share L1's sets, are copied instead: for
    speed only, which this test cannot see; it holds the copied rows' values."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    xb = randn(rng, 1, 3, 5, c).astype(ml_dtypes.bfloat16)
    layer = pwcpu.PointwiseConv(randn(rng, 8, c // groups), randn(rng, 8), stride=stride, groups=groups,
                                activation="relu", precision="bf16")
    np.testing.assert_array_equal(layer(xb), layer(xb.astype(np.float32)))


@pytest.mark.parametrize("k", [1, 8, 16, 17, 31, 32, 33, 40, 64, 77])
def test_bfloat16_out_written_by_the_kernels_for_every_column_count(isa, rng, k):
    """The kernels round a tile's columns to bfloat16 as they store them, two vectors at a time where
    they can: whole and partial pairs and a last single vector, for every number of columns."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    xb = randn(rng, 1, 3, 11, 24).astype(ml_dtypes.bfloat16)
    layer = pwcpu.PointwiseConv(randn(rng, k, 24), randn(rng, k), activation="relu6", precision="bf16")
    out = np.full((1, 3, 11, k), np.nan, ml_dtypes.bfloat16)
    layer(xb, out=out)
    np.testing.assert_array_equal(out.view(np.uint16), layer(xb).astype(ml_dtypes.bfloat16).view(np.uint16))


def test_bfloat16_out_over_its_input_and_errors(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = randn(rng, 1, 3, 4, 6).astype(ml_dtypes.bfloat16)
    layer = pwcpu.PointwiseConv(randn(rng, 6, 6), precision="bf16")
    expected = layer(x.astype(np.float32)).astype(ml_dtypes.bfloat16).view(np.uint16)
    layer(x, out=x)  # out over x: computed first, then stored (never read while written)
    np.testing.assert_array_equal(x.view(np.uint16), expected)
    if layer._plan.reads_bfloat16:
        bits = np.zeros((1, 3, 4, 6), np.uint16)
        with pytest.raises(ValueError, match="shape"):
            layer._plan.conv_bfloat16_into(bits, np.zeros((1, 3, 4, 5), np.uint16))
        with pytest.raises(ValueError, match="overlaps x"):
            layer._plan.conv_bfloat16_into(bits, bits)
        with pytest.raises(ValueError, match="contiguous channel"):
            layer._plan.conv_bfloat16_into(bits, np.zeros((1, 3, 4, 12), np.uint16)[..., ::2])
        with pytest.raises(TypeError, match="uint16 bits"):
            layer._plan.conv_bfloat16_into(bits, np.zeros((1, 3, 4, 6), np.float32))


def test_reading_bfloat16_errors(rng):
    layer = pwcpu.PointwiseConv(randn(rng, 3, 4), precision="fp32")
    assert not layer._plan.reads_bfloat16  # float32 precision widens bfloat16 inputs
    with pytest.raises(ValueError, match="do not read bfloat16"):
        layer._plan.conv_bfloat16(np.zeros((1, 2, 2, 4), np.uint16), None, None)
    bf16_layer = pwcpu.PointwiseConv(randn(rng, 3, 4), precision="bf16")
    if bf16_layer._plan.reads_bfloat16:
        with pytest.raises(TypeError, match="uint16 bits"):
            bf16_layer._plan.conv_bfloat16(np.zeros((1, 2, 2, 4), np.float32), None, None)
        with pytest.raises(ValueError, match="channels"):
            bf16_layer._plan.conv_bfloat16(np.zeros((1, 2, 2, 5), np.uint16), None, None)


def test_bfloat16_out_errors(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x, weight = randn(rng, 1, 2, 2, 4), randn(rng, 3, 4)
    with pytest.raises(ValueError, match="shape"):
        pwcpu.conv1x1(x, weight, out=np.empty((1, 2, 2, 4), ml_dtypes.bfloat16), precision="bf16")
    readonly = np.empty((1, 2, 2, 3), ml_dtypes.bfloat16)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        pwcpu.conv1x1(x, weight, out=readonly, precision="bf16")


@pytest.mark.parametrize("call", ["conv1x1", "pointwise", "PointwiseConv"])
def test_precision_errors(rng, call):
    x, weight = randn(rng, 1, 2, 2, 4), randn(rng, 3, 4)

    def run(precision):
        if call == "PointwiseConv":
            return pwcpu.PointwiseConv(weight, precision=precision)(x)
        return getattr(pwcpu, call)(x, weight, precision=precision)

    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or 'int8', got 'fp16'"):
        run("fp16")
    with pytest.raises(TypeError, match="precision must be 'fp32', 'bf16' or 'int8', got int"):
        run(16)
    assert run("fp32").dtype == np.float32


def test_pointwise_conv_block_folds_then_rounds(rng):
    block = pwcpu.PointwiseConvBlock(16, 8, activation="relu", precision="bf16")
    assert block.precision == "bf16" and block.layer.precision == "bf16" and "precision='bf16'" in repr(block)
    state = {"conv.weight": randn(rng, 8, 16, 1, 1), "bn.weight": randn(rng, 8), "bn.bias": randn(rng, 8),
             "bn.running_mean": randn(rng, 8), "bn.running_var": np.abs(randn(rng, 8)) + 0.5}
    block.load_state_dict(state)
    x = randn(rng, 1, 4, 4, 16)
    # BatchNorm is folded in float64 first; the folded float32 weights are what bf16 rounds.
    folded = pwcpu.PointwiseConv(block.layer.weight, block.layer.bias, activation="relu", precision="bf16")
    np.testing.assert_array_equal(block(x), folded(x))
    with pytest.raises(ValueError, match="precision"):
        pwcpu.PointwiseConvBlock(16, 8, precision="int4")


@pytest.mark.parametrize("padding,groups,block", [(0, 1, 0), (1, 1, 0), (1, 2, 0), (0, 1, 300)])
def test_weights_beyond_l2(isa, rng, padding, groups, block):
    """Weights of several L2-sized blocks of panels (2-4 MiB in bf16): each thread rounds its rows
    once, up front, for all the blocks (with groups, and with the reduction split)."""
    c = k = 2048
    assert k * c // groups * 2 > pwcpu.runtime_info()["l2_bytes"] // 2
    x, weight, bias = randn(rng, 1, 3, 5, c), randn(rng, k, c // groups), randn(rng, k)
    options = dict(padding=padding, stride=2, groups=groups, activation="relu")
    _core.set_max_reduction_block(block)
    try:
        for threads in (1, 2):
            with pwcpu.num_threads(threads):
                y = pwcpu.conv1x1(x, weight, bias, precision="bf16", **options)
            check_conv(y, x, weight, bias, precision="bf16", **options)
            if float32_kernels():
                np.testing.assert_array_equal(y, pwcpu.conv1x1(bf16_values(x), bf16_values(weight), bias, **options))
    finally:
        _core.set_max_reduction_block(0)


@pytest.mark.parametrize("n,h,w_,c,e,k,kernel,stride", [(2, 13, 15, 16, 96, 24, 3, 2), (1, 40, 40, 24, 144, 24, 3, 1),
                                                         (2, 7, 7, 64, 384, 96, 3, 1), (1, 30, 30, 24, 144, 32, 5, 2)])
def test_inverted_residual_bf16_is_its_stages_in_bf16(isa, rng, n, h, w_, c, e, k, kernel, stride):
    """The fused block's 1x1 stages in bf16, its depthwise stage in float32: bitwise the three layers
    called one after another at those precisions, whether it runs in bands or in turn."""
    ew, eb, dw, db = randn(rng, e, c) / np.float32(c**0.5), randn(rng, e), randn(rng, e, kernel, kernel), randn(rng, e)
    pw, pb = randn(rng, k, e) / np.float32(e**0.5), randn(rng, k)
    x = randn(rng, n, h, w_, c)
    block = pwcpu.InvertedResidual(ew, eb, dw, db, pw, pb, stride=stride, precision="bf16")
    assert block.precision == "bf16" and "precision='bf16'" in repr(block)
    h1 = pwcpu.conv1x1(x, ew, eb, activation="relu6", precision="bf16")
    h2 = pwcpu.depthwise_conv2d(h1, dw, db, stride=stride, padding=kernel // 2, activation="relu6")
    expected = pwcpu.conv1x1(h2, pw, pb, residual=x if block.residual else None, precision="bf16")
    for threads in (1, 2):
        with pwcpu.num_threads(threads):
            np.testing.assert_array_equal(block(x), expected)
    assert not np.array_equal(expected, pwcpu.InvertedResidual(ew, eb, dw, db, pw, pb, stride=stride)(x))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(block))(x), expected)
    with pytest.raises(ValueError, match="precision"):
        pwcpu.InvertedResidual(ew, eb, dw, db, pw, pb, precision="bfloat16")
