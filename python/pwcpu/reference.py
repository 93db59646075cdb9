"""The specification: the same operations computed plainly in float64 with NumPy.

Short and obviously right; every test compares pwcpu against these functions. Results are float64.
Infinities and NaNs follow IEEE arithmetic quietly (no floating-point warnings), as pwcpu does.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ACTIVATION_FUNCTIONS", "conv1x1", "conv2d", "depthwise_conv2d", "int8_operands", "pointwise",
           "qlinear_conv1x1", "quantize_int8_rows", "quantize_int8_weights", "round_to_bf16"]

_erf = np.frompyfunc(math.erf, 1, 1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


ACTIVATION_FUNCTIONS = {
    None: lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "relu6": lambda z: np.clip(z, 0.0, 6.0),
    "silu": lambda z: z * _sigmoid(z),
    "gelu": lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)).astype(np.float64)),
    "hardswish": lambda z: z * np.clip(z + 3.0, 0.0, 6.0) / 6.0,
    "sigmoid": _sigmoid,
    "hardsigmoid": lambda z: np.clip(z + 3.0, 0.0, 6.0) / 6.0,
}


def round_to_bf16(a) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32: NaN stays NaN
    (quiet), values beyond the largest bfloat16 become infinities."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    quiet_nan = ((bits | 0x00400000) & 0xFFFF0000).astype(np.uint32)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(is_nan, quiet_nan, rounded).view(np.float32)


@np.errstate(all="ignore")
def quantize_int8_rows(x, groups=1):
    """precision="int8"'s view of activations: each pixel's channels (each group's, with groups) as
    int8 with a scale and zero point of their own, their range (0 included) over 255 steps, computed
    in float32 as pwcpu does. Returns (values less the zero point, as float64; scales, float32 of
    shape x.shape[:-1] + (groups,)). A group of zeros (or of values too small for a normal scale)
    gets scale 0; one holding a NaN or an infinity gets NaN values."""
    x = np.asarray(x, dtype=np.float32)
    rows = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    low = np.minimum(rows.min(axis=-1, initial=np.inf), np.float32(0))
    high = np.maximum(rows.max(axis=-1, initial=-np.inf), np.float32(0))
    scale = (high - low) / np.float32(255)
    finite = np.isfinite(rows).all(axis=-1)
    usable = finite & (scale >= np.finfo(np.float32).tiny)
    inverse = np.float32(255) / np.where(usable, high - low, np.float32(1))
    zero_point = np.clip(np.rint(np.float32(-128) - low * inverse), -128, 127).astype(np.float32)
    t = np.clip(rows * inverse[..., None], (np.float32(-128) - zero_point)[..., None],
                (np.float32(127) - zero_point)[..., None])
    values = np.where(usable[..., None], np.rint(t), 0.0).astype(np.float64)
    values = np.where(finite[..., None], values, np.nan)
    scale = np.where(usable, scale, np.where(finite, np.float32(0), np.float32(np.nan))).astype(np.float32)
    return values.reshape(x.shape), scale


def quantize_int8_weights(weight):
    """precision="int8"'s view of (K, C) weights: each output channel symmetric, over 127 steps of
    its largest magnitude. Returns (int8 values as float64, scales float32 (K,))."""
    w = np.asarray(weight, dtype=np.float32).reshape(np.shape(weight)[0], -1)
    scale = np.abs(w).max(axis=1, initial=np.float32(0)) / np.float32(127)
    scale = np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    values = np.where(scale[:, None] > 0, np.clip(np.rint(w / safe[:, None]), -127, 127), 0.0)
    return values.astype(np.float64), scale


def int8_operands(x, weight, groups=1):
    """x (channels last) and weight as precision="int8" multiplies them: the quantized values times
    their scales, float64."""
    values, scale = quantize_int8_rows(x, groups)
    per_channel = np.repeat(scale.astype(np.float64), values.shape[-1] // groups, axis=-1)
    w_values, w_scale = quantize_int8_weights(weight)
    return values * per_channel, (w_values * w_scale.astype(np.float64)[:, None]).reshape(np.shape(weight))


def _inputs(x, weight, precision, groups=1):
    """x and weight as the precision reads them, in float64."""
    if precision == "int8":
        return int8_operands(x, weight, groups)
    if precision == "bf16":
        x, weight = round_to_bf16(x), round_to_bf16(weight)
    elif precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}")
    return np.asarray(x, dtype=np.float64), np.asarray(weight, dtype=np.float64)


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


@np.errstate(all="ignore")
def conv1x1(x, weight, bias=None, *, stride=1, padding=0, groups=1, activation=None, residual=None, layout="NHWC",
            precision="fp32"):
    if layout == "NCHW":
        to_nhwc = (0, 2, 3, 1)
        r = None if residual is None else np.moveaxis(np.asarray(residual), 1, -1)
        y = conv1x1(np.transpose(x, to_nhwc), weight, bias, stride=stride, padding=padding, groups=groups,
                    activation=activation, residual=r, precision=precision)
        return np.moveaxis(y, -1, 1)
    x, w = _inputs(x, weight, precision, groups)
    w = w.reshape(w.shape[0], w.shape[1])
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    xs = padded[:, ::sh, ::sw, :]
    cg, kg = w.shape[1], w.shape[0] // groups
    z = np.concatenate(
        [xs[..., g * cg : (g + 1) * cg] @ w[g * kg : (g + 1) * kg].T for g in range(groups)], axis=-1
    )
    return _epilogue(z, bias, residual, activation)


@np.errstate(all="ignore")
def pointwise(x, weight, bias=None, *, activation=None, residual=None, precision="fp32"):
    x, w = _inputs(x, weight, precision)
    z = x @ w.reshape(w.shape[0], w.shape[1]).T
    return _epilogue(z, bias, residual, activation)


@np.errstate(all="ignore")
def _windows(x, kernel, stride, padding):
    """Yield ((i, j), the input values tap (i, j) of every output window reads), NHWC, zero padding."""
    x = np.asarray(x, dtype=np.float64)
    (sh, sw), (ph, pw), (kh, kw) = _pair(stride), _pair(padding), kernel
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    ho = max((padded.shape[1] - kh) // sh + 1, 0) if padded.shape[1] >= kh else 0
    wo = max((padded.shape[2] - kw) // sw + 1, 0) if padded.shape[2] >= kw else 0
    for i in range(kh):
        for j in range(kw):
            yield (i, j), padded[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :][:, :ho, :wo]


@np.errstate(all="ignore")  # infinite inputs make NaN and inf quietly, as in conv1x1
def depthwise_conv2d(x, weight, bias=None, *, stride=1, padding=0, activation=None, residual=None):
    """NHWC depthwise convolution: ``weight`` (C, kh, kw) or (C, 1, kh, kw), zero padding."""
    w = np.asarray(weight, dtype=np.float64)
    w = w.reshape(w.shape[0], w.shape[-2], w.shape[-1])
    z = sum(tap * w[:, i, j] for (i, j), tap in _windows(x, w.shape[1:], stride, padding))
    return _epilogue(z, bias, residual, activation)


@np.errstate(all="ignore")  # infinite inputs make NaN and inf quietly, as in conv1x1
def conv2d(x, weight, bias=None, *, stride=1, padding=0, groups=1, activation=None, residual=None):
    """NHWC dense convolution: ``weight`` (K, C // groups, kh, kw) as PyTorch's, zero padding."""
    w = np.asarray(weight, dtype=np.float64)
    kg, cg = w.shape[0] // groups, w.shape[1]
    z = sum(np.concatenate([tap[..., g * cg:(g + 1) * cg] @ w[g * kg:(g + 1) * kg, :, i, j].T for g in range(groups)],
                           axis=-1)
            for (i, j), tap in _windows(x, w.shape[2:], stride, padding))
    return _epilogue(z, bias, residual, activation)


def _epilogue(z, bias, residual, activation):
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    if residual is not None:
        z = z + np.asarray(residual, dtype=np.float64)
    return ACTIVATION_FUNCTIONS[activation](z)


def qlinear_conv1x1(x, x_scale, x_zero_point, weight, w_scale, w_zero_point, y_scale, y_zero_point, bias=None, *,
                    stride=1, padding=0, groups=1, y_dtype=None):
    """ONNX QLinearConv with a 1x1 kernel on NHWC 8-bit x: the exact integer sums (float64 sums of
    integers, exact below 2^53),
    requantized in float32 as ONNX Runtime does it (the sum converted to float32, multiplied by
    (x_scale * w_scale) / y_scale, clamped to the output range less its zero point, rounded to
    nearest even, the zero point added). y_dtype defaults to x's type. Padding reads x_zero_point."""
    x = np.asarray(x)
    y_dtype = np.dtype(y_dtype or x.dtype)
    k = np.shape(weight)[0]
    w = np.asarray(weight).reshape(np.shape(weight)[:2]).astype(np.float64)
    w = w - np.broadcast_to(np.asarray(w_zero_point, np.float64), (k,))[:, None]
    # The float64 convolution of integers below 2^53 in magnitude is exact; zero padding of the
    # shifted input is padding with x_zero_point.
    acc = np.rint(conv1x1(x.astype(np.float64) - int(x_zero_point), w, stride=stride, padding=padding,
                          groups=groups)).astype(np.int64)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    if np.abs(acc).max(initial=0) >= 2**31:
        raise OverflowError("the sums exceed int32")
    scale = (np.float32(x_scale) * np.broadcast_to(np.asarray(w_scale, np.float32), (k,))) / np.float32(y_scale)
    info, zero = np.iinfo(y_dtype), int(y_zero_point)
    scaled = acc.astype(np.float32) * scale.astype(np.float32)
    q = np.rint(np.clip(scaled, np.float32(info.min - zero), np.float32(info.max - zero))).astype(np.int64) + zero
    return q.astype(y_dtype)
