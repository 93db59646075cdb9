"""The specification: the same operations computed plainly in float64 with NumPy.

Short and obviously right; every test compares pwcpu against these functions. Results are float64.
Infinities and NaNs follow IEEE arithmetic quietly (no floating-point warnings), as pwcpu does.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ACTIVATION_FUNCTIONS", "conv1x1", "conv2d", "depthwise_conv2d", "pointwise", "round_to_bf16"]

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


def _inputs(x, weight, precision):
    """x and weight as the precision reads them, in float64."""
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
    x, w = _inputs(x, weight, precision)
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


def depthwise_conv2d(x, weight, bias=None, *, stride=1, padding=0, activation=None, residual=None):
    """NHWC depthwise convolution: ``weight`` (C, kh, kw) or (C, 1, kh, kw), zero padding."""
    w = np.asarray(weight, dtype=np.float64)
    w = w.reshape(w.shape[0], w.shape[-2], w.shape[-1])
    z = sum(tap * w[:, i, j] for (i, j), tap in _windows(x, w.shape[1:], stride, padding))
    return _epilogue(z, bias, residual, activation)


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
