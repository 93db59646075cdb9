"""Fuzzing the Python boundary: arbitrary argument combinations, valid and invalid.

Every call must either match the reference or raise TypeError, ValueError or MemoryError; it
must never crash, and it must leave every input (and, when it fails, ``out``) unchanged.
"""

import functools

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pwcpu
from pwcpu import reference
from helpers import conv_bound, dense_bound, pointwise_bound

FUZZ_EXAMPLES = 1500
ACCEPTED_ERRORS = (TypeError, ValueError, MemoryError)


def variants(draw, valid, invalid):
    """The valid value most of the time, else one of the invalid ones."""
    return valid if draw(st.integers(0, 11)) else draw(st.sampled_from(invalid))


@st.composite
def calls(draw, dense=False):
    """Arguments for conv1x1, or with ``dense`` for conv2d (weights (K, C // groups, kh, kw))."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (2, 3), (1, 5)])) if dense else (1, 1)
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg, kg = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    n, h, w = draw(st.integers(0, 2)), draw(st.integers(0, 6)), draw(st.integers(0, 6))
    c, k = cg * groups, kg * groups
    stride = draw(st.sampled_from([(1, 1), (2, 2), (3, 3), (1, 2), (2, 1)]))
    padding = draw(st.sampled_from([(0, 0), (1, 1), (0, 2)]))
    out_shape = tuple(max((s + 2 * p - kk) // st_ + 1, 0) if s + 2 * p >= kk else 0
                      for s, p, st_, kk in zip((h, w), padding, stride, kernel))
    out_shape = (n,) + out_shape + (k,)

    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    if draw(st.booleans()) and x.size:
        x.flat[rng.integers(0, x.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e-39, 3e38]))
    x_view = draw(st.sampled_from(["plain", "strided", "reversed", "channels_strided"]))
    if x_view != "plain":
        big = rng.standard_normal((n, 2 * h, w, 3 * c), dtype=np.float32)
        x = {"strided": big[:, ::2, :, :c], "reversed": big[:, ::-2, ::-1, c:2 * c],
             "channels_strided": big[:, ::2, :, ::3]}[x_view]
    if draw(st.integers(0, 5)) == 0:  # zero strides: one pixel (or one image) broadcast everywhere
        x = np.broadcast_to(x[:1, :1, :1] if draw(st.booleans()) else x[:1], x.shape)
    huge = np.broadcast_to(np.ones((1, 1, 1, c), np.float32), (2**40, 1, 1, c))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and 3e38 cast to int32 / float16
        x = variants(draw, x, [x.astype(np.float64), x.astype(np.int32), x.astype(np.float16), x.tolist(), None,
                               "x", x.sum(axis=0), x[..., None], x.astype(">f4"), huge])

    weight = rng.standard_normal((k, cg) + (kernel if dense else ()), dtype=np.float32)
    if draw(st.integers(0, 5)) == 0:  # zero-stride weights, read in place
        weight = np.broadcast_to(weight[:1] if draw(st.booleans()) else weight[:, :1], weight.shape)
    taps = kernel[0] * kernel[1]
    absurd = np.broadcast_to(np.float32(1), (2**60 // (max(cg, 1) * taps), max(cg, 1)) + (kernel if dense else ()))
    wrong_rank = weight[:, :, 0] if dense else weight[:, :, None, None]
    wrong_kernel = weight[:, :, :0] if dense else np.zeros((k, cg, 3, 3), np.float32)
    weight = variants(draw, weight, [wrong_rank, weight.astype(np.float64), np.swapaxes(weight, 0, 1).copy(),
                                     weight[:, :1], weight[None], None, wrong_kernel, absurd])
    bias = draw(st.sampled_from([None, "valid"]))
    if bias == "valid":
        bias = rng.standard_normal(k, dtype=np.float32)
    bias = variants(draw, bias, [np.zeros(k + 1, np.float32), np.zeros(k), np.zeros((k, 1), np.float32), [1.0] * k])

    stride = variants(draw, stride, [0, -1, 2**31, 2**62, 1.5, "2", (1, 2, 3), (0, 1), True, None])
    padding = variants(draw, padding, [-1, 2**31 - 1, 2**62, 0.5, (1,), (-1, 0), None])
    groups = variants(draw, groups, [0, -1, 2**40, 2.0, groups + 1, "1", None])
    activation = variants(draw, draw(st.sampled_from(list(pwcpu.ACTIVATIONS))), ["tanh", "RELU", 1, b"relu"])

    residual = draw(st.sampled_from([None, "valid"]))
    if residual == "valid":
        residual = rng.standard_normal(out_shape, dtype=np.float32)
    residual = variants(draw, residual, [np.zeros(out_shape), np.zeros((1, 2, 3), np.float32), "r"])

    out_kind = draw(st.sampled_from(["none", "fresh", "slice", "residual"]))
    out = None
    if out_kind == "fresh":
        out = np.full(out_shape, 7.0, np.float32)
    elif out_kind == "slice":
        out = np.full(out_shape[:3] + (out_shape[3] + 4,), 7.0, np.float32)[..., 2:2 + out_shape[3]]
    elif out_kind == "residual" and isinstance(residual, np.ndarray):
        out = residual
    out = variants(draw, out, [np.zeros(out_shape), np.zeros(out_shape, np.float32)[..., ::-1][..., ::2],
                               _read_only(out_shape), np.zeros(out_shape, np.float32).tolist(), "out",
                               np.zeros((1,) + out_shape, np.float32)[0, :, :, :, :]])
    if draw(st.integers(0, 9)) == 0 and isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4:
        out = x  # out overlapping an input
    return dict(x=x, weight=weight, bias=bias, stride=stride, padding=padding, groups=groups,
                activation=activation, residual=residual, out=out)


def _read_only(shape):
    a = np.zeros(shape, np.float32)
    a.flags.writeable = False
    return a


def _snapshot(value):
    # Read-only arrays (like a 4 TiB broadcast view) cannot change; copy only writable ones.
    return value.copy() if isinstance(value, np.ndarray) and value.flags.writeable else value


def _unchanged(before, after):
    if not isinstance(after, np.ndarray):
        return True
    return before.shape == after.shape and np.array_equal(before, after, equal_nan=True)


def _check_boundary(function, call, bound):
    """The fuzzers' contract: a clean error leaving every argument as it was, or the reference."""
    before = {name: _snapshot(value) for name, value in call.items()}
    try:
        y = function(call["x"], call["weight"], call["bias"], stride=call["stride"], padding=call["padding"],
                     groups=call["groups"], activation=call["activation"], residual=call["residual"],
                     out=call["out"])
    except ACCEPTED_ERRORS as e:
        event(f"raised {type(e).__name__}")
        for name, value in call.items():
            assert _unchanged(before[name], value), f"{name} changed by a call that failed"
        return
    event("computed")
    # It succeeded: the arguments were valid, so the reference applies.
    for name in ("x", "weight", "bias") + (() if call["out"] is call["residual"] else ("residual",)):
        assert _unchanged(before[name], call[name]), f"{name} changed"
    if call["out"] is not None:
        assert y is call["out"]
    if y.size == 0:
        return
    expected, tolerance = bound(before["x"], np.asarray(call["weight"]), call["bias"], stride=call["stride"],
                                padding=call["padding"], groups=call["groups"], activation=call["activation"],
                                residual=before["residual"])
    comparable = np.isfinite(expected) & np.isfinite(tolerance)  # no bound where float32 may overflow
    assert np.all(np.abs(y[comparable].astype(np.float64) - expected[comparable]) <= tolerance[comparable])
    assert np.all(np.isnan(y[np.isnan(expected)])), "NaN must propagate"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_boundary_never_crashes_or_corrupts(call):
    def bound(x, weight, *args, **options):
        return conv_bound(x, weight.reshape(weight.shape[:2]), *args, **options)
    _check_boundary(pwcpu.conv1x1, call, bound)


@settings(max_examples=FUZZ_EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_int8_boundary_never_crashes_or_corrupts(call):
    def bound(x, weight, *args, **options):
        return conv_bound(x, weight.reshape(weight.shape[:2]), *args, precision="int8", **options)
    _check_boundary(functools.partial(pwcpu.conv1x1, precision="int8"), call, bound)


@st.composite
def qlinear_calls(draw):
    """Arguments for qlinear_conv1x1: 8-bit x and weights of either type, valid and invalid."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x_type, w_type = draw(st.sampled_from([np.uint8, np.int8])), draw(st.sampled_from([np.uint8, np.int8]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg, kg = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    n, h, w = draw(st.integers(0, 2)), draw(st.integers(0, 6)), draw(st.integers(0, 6))
    c, k = cg * groups, kg * groups
    stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 3)]))
    padding = draw(st.sampled_from([(0, 0), (1, 1), (0, 2)]))
    info, w_info = np.iinfo(x_type), np.iinfo(w_type)
    x = rng.integers(info.min, info.max + 1, (n, 2 * h, w, 2 * c)).astype(x_type)
    x = x[:, ::2, :, :c] if draw(st.booleans()) else np.ascontiguousarray(x[:, :h, :, c:])
    x = variants(draw, x, [x.astype(np.float32), x.astype(np.int16), x.tolist(), None, x[0] if n else None])
    weight = rng.integers(w_info.min, w_info.max + 1, (k, cg)).astype(w_type)
    weight = variants(draw, weight, [weight.astype(np.float32), weight[None], None])
    w_scale = (rng.random(k) + 0.01).astype(np.float32) if draw(st.booleans()) else 0.01
    w_scale = variants(draw, w_scale, [0.0, -1.0, np.nan, np.ones(k + 1), "s"])
    w_zero = rng.integers(w_info.min, w_info.max + 1, k) if draw(st.booleans()) else 0
    w_zero = variants(draw, w_zero, [1000, np.full(k, 0.5), np.ones(k + 2, np.int64)])
    bias = rng.integers(-(2**20), 2**20, k).astype(np.int32) if draw(st.booleans()) else None
    bias = variants(draw, bias, [np.zeros(k, np.float32), np.zeros(k + 1, np.int32), [2**40] * k])
    x_zero = variants(draw, x_type(rng.integers(info.min, info.max + 1)), [x_type(0).astype(np.int32), 999, None])
    y_type = draw(st.sampled_from([np.uint8, np.int8]))
    y_zero = variants(draw, y_type(rng.integers(np.iinfo(y_type).min, np.iinfo(y_type).max + 1)), [-1000, "z"])
    scales = [variants(draw, float(rng.random() + 0.01), [0.0, np.inf, None]) for _ in range(2)]
    stride = variants(draw, stride, [0, (1, 2, 3), None])
    padding = variants(draw, padding, [-1, None])
    groups = variants(draw, groups, [0, groups + 1, None])
    out_shape = (n,) + tuple((s + 2 * p - 1) // st_ + 1 for s, p, st_ in zip((h, w), padding_of(padding),
                                                                            stride_of(stride))) + (k,)
    out = None
    if draw(st.booleans()) and min(out_shape) >= 0:
        out = np.full(out_shape, 7, y_type)
        out = variants(draw, out, [out.astype(np.float32), out[..., ::-1][..., ::2], x if isinstance(x, np.ndarray) else None])
    return dict(x=x, x_scale=scales[0], x_zero_point=x_zero, weight=weight, w_scale=w_scale, w_zero_point=w_zero,
                y_scale=scales[1], y_zero_point=y_zero, bias=bias, stride=stride, padding=padding, groups=groups,
                out=out)


def padding_of(padding):
    return padding if isinstance(padding, tuple) and len(padding) == 2 else (0, 0)


def stride_of(stride):
    return stride if isinstance(stride, tuple) and len(stride) == 2 else (1, 1)


@settings(max_examples=FUZZ_EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qlinear_calls())
def test_qlinear_boundary_never_crashes_or_corrupts(call):
    """A clean error leaving every argument as it was, or exactly the integer reference."""
    before = {name: _snapshot(value) for name, value in call.items()}
    try:
        y = pwcpu.qlinear_conv1x1(**call)
    except ACCEPTED_ERRORS + (OverflowError,) as e:
        event(f"raised {type(e).__name__}")
        for name, value in call.items():
            assert _unchanged(before[name], value), f"{name} changed by a call that failed"
        return
    event("computed")
    for name in ("x", "weight", "bias"):
        assert _unchanged(before[name], call[name]), f"{name} changed"
    if call["out"] is not None:
        assert y is call["out"]
    if y.size == 0:
        return
    options = {name: before[name] for name in before if name != "out"}
    np.testing.assert_array_equal(y, reference.qlinear_conv1x1(**options, y_dtype=y.dtype))


@settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls(dense=True))
def test_dense_boundary_never_crashes_or_corrupts(call):
    _check_boundary(pwcpu.conv2d, call, dense_bound)


# ---- pointwise over views of every leading axis ----------------------------------------------


def _leading_view(draw, rng, shape, channels, writable):
    """A random view of shape ``shape + (channels,)``: slices, steps, reversals, transposes and
    (for inputs) broadcasts of the leading axes, and a slice of a wider channel axis."""
    steps = [draw(st.sampled_from([1, 1, 2, -1, -2])) for _ in shape]
    padded = tuple(n * abs(step) for n, step in zip(shape, steps)) + (channels + 3,)
    memory_order = list(draw(st.permutations(range(len(shape))))) + [len(shape)]  # leading axes permuted in memory
    base = np.ascontiguousarray(rng.standard_normal(padded, dtype=np.float32).transpose(memory_order))
    base = base.transpose(np.argsort(memory_order))
    view = base[tuple(slice(None, None, step) for step in steps) + (slice(1, 1 + channels),)]
    if not writable and shape and view.size and draw(st.integers(0, 3)) == 0:
        axis = draw(st.integers(0, len(shape) - 1))
        view = np.broadcast_to(np.take(view, [0], axis=axis), view.shape)
    assert view.shape == tuple(shape) + (channels,)
    return view


@st.composite
def pointwise_calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=4))
    c, k = draw(st.integers(0, 9)), draw(st.integers(1, 9))
    x = _leading_view(draw, rng, shape, c, writable=False)
    weight = rng.standard_normal((k, c), dtype=np.float32)
    if draw(st.integers(0, 4)) == 0:
        weight = np.broadcast_to(weight[:1], weight.shape)
    residual = _leading_view(draw, rng, shape, k, writable=False) if draw(st.booleans()) else None
    out_kind = draw(st.sampled_from(["none", "view", "residual"]))
    out = None
    if out_kind == "view":
        out = _leading_view(draw, rng, shape, k, writable=True)
    elif out_kind == "residual" and residual is not None and residual.flags.writeable:
        out = residual
    return dict(x=x, weight=weight, residual=residual, out=out)


@settings(max_examples=FUZZ_EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pointwise_calls())
def test_pointwise_takes_any_leading_view(call):
    before = {name: _snapshot(value) for name, value in call.items()}
    try:
        y = pwcpu.pointwise(call["x"], call["weight"], residual=call["residual"], out=call["out"])
    except ValueError as e:
        # Only an out whose leading axes cannot be walked as three strided axes may be refused.
        assert call["out"] is not None and "leading axes" in str(e), e
        event("out refused")
        return
    event("computed")
    if call["out"] is not None:
        assert y is call["out"]
    expected, tolerance = pointwise_bound(before["x"], call["weight"], residual=before["residual"])
    assert np.all(np.abs(y.astype(np.float64) - expected) <= tolerance)
