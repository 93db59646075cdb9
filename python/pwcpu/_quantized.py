"""Static int8 1x1 convolution with ONNX ``QLinearConv`` semantics: 8-bit tensors with scales and
zero points in, an 8-bit tensor out, exact integer sums."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

from . import _core
from ._api import IntPair, _int, _pair

__all__ = ["QuantizedPointwiseConv", "qlinear_conv1x1"]

_EIGHT_BIT = {np.dtype(np.uint8): False, np.dtype(np.int8): True}


def _eight_bit_type(name: str, zero_point, default: np.dtype) -> np.dtype:
    """The 8-bit type a zero point names (ONNX gives x and y the type of their zero point): its own
    NumPy dtype when it has one, else ``default``."""
    dtype = getattr(zero_point, "dtype", None)
    if dtype is None:
        return np.dtype(default)
    if np.dtype(dtype) not in _EIGHT_BIT:
        raise TypeError(f"{name} must be a uint8 or int8 value (or a Python int), got {np.dtype(dtype)}")
    return np.dtype(dtype)


def _zero_point(name: str, value, dtype: np.dtype) -> int:
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a single value, got shape {np.shape(value)}")
    value = value.item() if isinstance(value, np.ndarray) else value
    point = _int(name, value, -(2**31))
    info = np.iinfo(dtype)
    if not info.min <= point <= info.max:
        raise ValueError(f"{name} must lie in {dtype}'s range {info.min}..{info.max}, got {point}")
    return point


def _scale(name: str, value) -> float:
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a single value, got shape {np.shape(value)}")
    value = value.item() if isinstance(value, np.ndarray) else value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    scale = float(np.float32(value))
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return scale


def _per_channel(name: str, value, channels: int, integer: bool) -> np.ndarray:
    """A per-tensor value repeated, or a per-output-channel vector, as int32 or float32."""
    a = np.asarray(value)
    if a.dtype.kind not in ("iu" if integer else "iuf"):
        raise TypeError(f"{name} must be {'integers' if integer else 'real numbers'}, got {a.dtype}")
    if a.ndim == 0:
        a = np.full(channels, a)
    elif a.shape != (channels,):
        raise ValueError(f"{name} must be one value or one per output channel ({channels}), got shape {a.shape}")
    if integer:
        if np.any(a < np.iinfo(np.int32).min) or np.any(a > np.iinfo(np.int32).max):
            raise ValueError(f"{name} must fit in int32")
        return a.astype(np.int32)
    return a.astype(np.float32)


class QuantizedPointwiseConv:
    """A prepacked static int8 1x1 convolution, ONNX ``QLinearConv`` (NHWC):

        acc[k] = bias[k] + sum_c (x[c] - x_zero_point) * (weight[k, c] - w_zero_point[k])   (exact)
        y[k] = saturate(round_half_to_even(acc[k] * (x_scale * w_scale[k] / y_scale)) + y_zero_point)

    the requantization in float32 as ONNX Runtime computes it. ``weight`` is int8 or uint8 with
    shape (K, C // groups) or PyTorch's (K, C // groups, 1, 1); ``w_scale`` and ``w_zero_point``
    are per tensor (one value) or per output channel; ``bias`` is int32 (in units of
    ``x_scale * w_scale``). x's and y's types are those of their zero points: NumPy uint8 or int8
    values (``np.uint8(128)``); a Python int means uint8 for x, and x's type for y. Padding reads
    ``x_zero_point`` (the real value 0). Exact wherever the integer sums fit in int32 (up to 65536
    input channels per group): no int16 saturation ever changes a result.
    """

    def __init__(self, weight, w_scale, w_zero_point, x_scale, x_zero_point, y_scale, y_zero_point,
                 bias=None, *, stride: IntPair = 1, padding: IntPair = 0, groups: int = 1) -> None:
        w = np.asarray(weight)
        if w.dtype not in _EIGHT_BIT:
            raise TypeError(f"weight must be int8 or uint8, got {w.dtype}")
        if w.ndim == 4 and w.shape[2:] == (1, 1):
            w = w.reshape(w.shape[0], w.shape[1])
        if w.ndim != 2:
            raise ValueError(f"weight must have shape (K, C // groups) or (K, C // groups, 1, 1), got {w.shape}")
        self._groups = _int("groups", groups, 1)
        if w.shape[0] % self._groups != 0:
            raise ValueError(f"groups ({self._groups}) must divide the output channels ({w.shape[0]})")
        self._stride = _pair("stride", stride, 1)
        self._padding = _pair("padding", padding, 0)
        self.x_dtype = _eight_bit_type("x_zero_point", x_zero_point, np.uint8)
        self.y_dtype = _eight_bit_type("y_zero_point", y_zero_point, self.x_dtype)
        k = w.shape[0]
        self._weight = np.array(w)
        self._weight.flags.writeable = False
        self._params = dict(
            w_scale=_per_channel("w_scale", w_scale, k, integer=False),
            w_zero_point=_per_channel("w_zero_point", w_zero_point, k, integer=True),
            bias=None if bias is None else _per_channel("bias", bias, k, integer=True),
            x_scale=_scale("x_scale", x_scale), x_zero_point=_zero_point("x_zero_point", x_zero_point, self.x_dtype),
            y_scale=_scale("y_scale", y_scale), y_zero_point=_zero_point("y_zero_point", y_zero_point, self.y_dtype),
        )
        p = self._params
        # What pickling rebuilds the layer from (typed zero points keep x's and y's types).
        self._arguments = (self._weight, p["w_scale"], p["w_zero_point"], np.float32(p["x_scale"]),
                           self.x_dtype.type(p["x_zero_point"]), np.float32(p["y_scale"]),
                           self.y_dtype.type(p["y_zero_point"]), p["bias"])
        self._plan = _core.QuantizedConvPlan(
            self._weight, p["w_scale"], p["w_zero_point"], p["bias"], self._groups, *self._stride, *self._padding,
            p["x_scale"], p["x_zero_point"], _EIGHT_BIT[self.x_dtype], p["y_scale"], p["y_zero_point"],
            _EIGHT_BIT[self.y_dtype])

    def __call__(self, x, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        """y for an (N, H, W, C) array x of ``x_dtype``, written into ``out`` (of ``y_dtype``) when given."""
        return self._plan.conv(x, out)

    def __reduce__(self):
        options = dict(stride=self._stride, padding=self._padding, groups=self._groups)
        return _rebuild_quantized_pointwise_conv, (self._arguments, options)

    @property
    def weight(self) -> np.ndarray:
        """The 8-bit weights, (K, C // groups), read-only."""
        return self._weight

    @property
    def kernel(self) -> str:
        return self._plan.kernel

    def __repr__(self) -> str:
        k, cg = self._weight.shape
        return (f"QuantizedPointwiseConv({cg * self._groups}, {k}, x={self.x_dtype}, y={self.y_dtype}, "
                f"stride={self._stride}, padding={self._padding}, groups={self._groups})")


def _rebuild_quantized_pointwise_conv(arguments, options) -> QuantizedPointwiseConv:
    return QuantizedPointwiseConv(*arguments, **options)


def qlinear_conv1x1(x, x_scale, x_zero_point, weight, w_scale, w_zero_point, y_scale, y_zero_point, bias=None, *,
                    stride: IntPair = 1, padding: IntPair = 0, groups: int = 1,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
    """ONNX ``QLinearConv`` with a 1x1 kernel on an NHWC uint8 or int8 array ``x``, in one call (see
    :class:`QuantizedPointwiseConv`; a Python int zero point takes x's type)."""
    x_type = np.asarray(x).dtype if hasattr(x, "dtype") else np.dtype(np.uint8)
    if not hasattr(x_zero_point, "dtype") and x_type in _EIGHT_BIT:
        x_zero_point = np.array(_zero_point("x_zero_point", x_zero_point, x_type), x_type)[()]
    layer = QuantizedPointwiseConv(weight, w_scale, w_zero_point, x_scale, x_zero_point, y_scale, y_zero_point, bias,
                                   stride=stride, padding=padding, groups=groups)
    return layer(x, out=out)
