"""The NumPy-facing API: argument checking, layout handling and calls into the compiled core.

Every public function validates its arguments here, before any memory is touched, and raises
TypeError (wrong type or dtype) or ValueError (wrong shape or value) with a message that names the
argument. Inputs whose layout the kernels cannot read in place are copied; outputs never are: an
``out`` the kernels cannot write directly is an error, so a result can never land in a temporary
that the caller does not see.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _core

__all__ = ["ACTIVATIONS", "PointwiseConv", "conv1x1", "pointwise"]

#: Names accepted by ``activation=``, mapped to the core's codes.
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "hardswish": 5, "sigmoid": 6}

IntPair = Union[int, Tuple[int, int], Sequence[int]]

# Larger strides, paddings or group counts cannot describe a real layer and would overflow the
# core's 64-bit index arithmetic once multiplied together.
_MAX_GEOMETRY = 2**31 - 1

_TooHardError = getattr(np, "exceptions", np).TooHardError
_FLOAT32 = np.dtype(np.float32)  # native byte order: '>f4' compares unequal


# ---- argument checking ---------------------------------------------------------------------


def _float32_array(name: str, value) -> np.ndarray:
    if value is None:
        raise TypeError(f"{name} must be a float32 array, not None")
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype != _FLOAT32:
        how = f"{name}.astype(np.float32)" if isinstance(value, np.ndarray) else f"np.asarray({name}, dtype=np.float32)"
        raise TypeError(
            f"{name} must be float32, got {array.dtype}; pwcpu never downcasts silently, convert it with {how}"
        )
    return array


def _kernel_readable(array: np.ndarray) -> bool:
    """Whether the kernels can read ``array`` in place: contiguous channels, float-sized strides."""
    flags = array.flags
    if flags.c_contiguous and flags.aligned:  # the common case, decided cheaply
        return True
    if array.size == 0:
        return True
    channels_ok = array.shape[-1] <= 1 or array.strides[-1] == array.itemsize
    return channels_ok and array.flags.aligned and all(s % array.itemsize == 0 for s in array.strides)


def _readable_copy(array: np.ndarray) -> np.ndarray:
    return array if _kernel_readable(array) else np.ascontiguousarray(array)


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not minimum <= value <= _MAX_GEOMETRY:
        raise ValueError(f"{name} must be between {minimum} and {_MAX_GEOMETRY}, got {value}")
    return value


def _pair(name: str, value, minimum: int) -> Tuple[int, int]:
    if isinstance(value, (numbers.Integral, bool, np.bool_)):
        v = _int(name, value, minimum)
        return v, v
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}")
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair (height, width), got {len(value)} values")
    return _int(name, value[0], minimum), _int(name, value[1], minimum)


def _activation_code(activation) -> int:
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or a string, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of {names}; got {activation!r}")
    return ACTIVATIONS[activation]


def _weight_matrix(weight, groups: int) -> np.ndarray:
    """``weight`` as a (K, C // groups) float32 view: accepts (K, Cg) and PyTorch's (K, Cg, 1, 1)."""
    w = _float32_array("weight", weight)
    if w.ndim == 4:
        if w.shape[2:] != (1, 1):
            raise ValueError(f"weight must have a 1x1 kernel, (K, C // groups, 1, 1); got shape {w.shape}")
        w = w[:, :, 0, 0]
    elif w.ndim != 2:
        raise ValueError(f"weight must have shape (K, C // groups) or (K, C // groups, 1, 1); got shape {w.shape}")
    if w.shape[0] % groups != 0:
        raise ValueError(f"groups={groups} must divide the output channels K={w.shape[0]}")
    return _readable_copy(w)


def _bias_vector(bias, out_channels: int) -> Optional[np.ndarray]:
    if bias is None:
        return None
    b = _float32_array("bias", bias)
    if b.shape != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},) to match weight, got {b.shape}")
    return np.ascontiguousarray(b)


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=100_000))
    except _TooHardError:  # pragma: no cover - only for pathological stride patterns
        return True


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
    )


def _check_out(out, shape: Tuple[int, ...]) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype != _FLOAT32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    if not _kernel_readable(out):
        raise ValueError(
            "out must have a contiguous channel (last) axis, be aligned and have float-sized strides; "
            f"got strides {out.strides}"
        )
    return out


def _check_residual(residual, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    if residual is None:
        return None
    r = _float32_array("residual", residual)
    if r.shape != shape:
        raise ValueError(f"residual must have the output's shape {shape}, got {r.shape}")
    return r


def _check_no_overlap(out: np.ndarray, residual: Optional[np.ndarray], inputs) -> None:
    """``inputs``: (name, array or None) pairs that out must not overlap."""
    for name, array in inputs:
        if array is not None and _overlaps(out, array):
            raise ValueError(f"out overlaps {name} in memory; use a separate output array")
    if residual is not None and not _same_view(out, residual) and _overlaps(out, residual):
        raise ValueError("out may be the very array passed as residual, but must not partly overlap it")


# ---- layout --------------------------------------------------------------------------------


def _as_4d(array: np.ndarray) -> Optional[np.ndarray]:
    """A 4-D view (A, B, D, C) of an array (..., C), merging leading axes without copying;
    None when the leading axes do not fit in three strided axes."""
    dims = [(n, s) for n, s in zip(array.shape[:-1], array.strides[:-1]) if n != 1]
    if any(n == 0 for n, _ in dims):
        dims = [(0, 0)]
    merged: list = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 3:
        return None
    merged = [(1, 0)] * (3 - len(merged)) + merged
    shape = tuple(n for n, _ in merged) + array.shape[-1:]
    strides = tuple(s for _, s in merged) + array.strides[-1:]
    return np.lib.stride_tricks.as_strided(array, shape, strides, writeable=array.flags.writeable)


# ---- the operations ------------------------------------------------------------------------


def _conv_output_shape(x_shape, stride, padding, out_channels) -> Tuple[int, int, int, int]:
    n, h, w, _ = x_shape
    ho = (h + 2 * padding[0] - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - 1) // stride[1] + 1
    return n, max(ho, 0), max(wo, 0), out_channels


class _Plan:
    """Packed weights plus everything a call needs, checked once: shared by conv1x1 (one call) and
    PointwiseConv (many calls), so both validate and run through the same code."""

    __slots__ = ("packed", "weight", "bias", "groups", "in_channels", "out_channels", "stride", "padding", "code",
                 "_last_shapes")

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray], groups: int, stride, padding, code: int):
        self.packed = _core.PackedWeights(weight, bias, groups)
        self.weight, self.bias, self.groups = weight, bias, groups
        self.in_channels, self.out_channels = weight.shape[1] * groups, weight.shape[0]
        self.stride, self.padding, self.code = stride, padding, code
        self._last_shapes = ((), ())  # (x.shape, output shape) of the last call: layers see one shape

    def output_shape(self, x_shape: Tuple[int, ...]) -> Tuple[int, ...]:
        if self._last_shapes[0] != x_shape:
            self._last_shapes = (x_shape, _conv_output_shape(x_shape, self.stride, self.padding, self.out_channels))
        return self._last_shapes[1]

    def repack_if_isa_changed(self) -> None:
        if self.packed.isa != _core.active_isa():
            self.packed = _core.PackedWeights(self.weight, self.bias, self.groups)

    def run(self, x, residual, out, weights_are_private: bool) -> np.ndarray:
        x = _float32_array("x", x)
        if x.ndim != 4:
            raise ValueError(f"x must have shape (N, H, W, C), got shape {x.shape}")
        if x.shape[3] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[3]} channels but the weight expects C = {self.in_channels} "
                f"(C // groups = {self.weight.shape[1]}, groups = {self.groups})"
            )
        shape = self.output_shape(x.shape)
        residual_in = _check_residual(residual, shape)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        else:
            out = _check_out(out, shape)
            inputs = (("x", x),) if weights_are_private else (("x", x), ("weight", self.weight), ("bias", self.bias))
            _check_no_overlap(out, residual_in, inputs)
        residual_arg = None
        if residual_in is not None:
            residual_arg = out if _same_view(out, residual_in) else _readable_copy(residual_in)
        (sh, sw), (ph, pw) = self.stride, self.padding
        self.packed.run(_readable_copy(x), out, residual_arg, sh, sw, ph, pw, self.code)
        return out


def conv1x1(
    x,
    weight,
    bias=None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    groups: int = 1,
    activation: Optional[str] = None,
    residual=None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """1x1 convolution of an NHWC float32 tensor, with a fused epilogue.

    ``y = activation(conv(x, weight) + bias + residual)``, computed in float32.

    Parameters
    ----------
    x : array_like, float32, shape (N, H, W, C)
        Input. Views with a contiguous channel axis are read in place (slices, crops, negative
        strides); other layouts are copied first.
    weight : array_like, float32, shape (K, C // groups) or (K, C // groups, 1, 1)
    bias : array_like, float32, shape (K,), optional
    stride, padding : int or (int, int)
        As in PyTorch: zero padding, ``Ho = (H + 2*ph - 1) // sh + 1``. Border outputs of a padded
        convolution are ``activation(bias + residual)``.
    groups : int
        Grouped convolution (ShuffleNet); must divide C and K.
    activation : None, "relu", "relu6", "silu", "gelu", "hardswish" or "sigmoid"
        ``gelu`` is the exact (erf) form.
    residual : array_like, float32, output shape, optional
        Added after the bias and before the activation. May be ``out`` itself (in-place accumulate).
    out : ndarray, float32, output shape, optional
        Written in place and returned. Its channel axis must be contiguous; other strides are free,
        so it can be a channel slice of a larger buffer.

    Returns
    -------
    ndarray, float32, shape (N, Ho, Wo, K)
    """
    groups = _int("groups", groups, 1)
    stride_hw = _pair("stride", stride, 1)
    padding_hw = _pair("padding", padding, 0)
    code = _activation_code(activation)
    w = _weight_matrix(weight, groups)
    b = _bias_vector(bias, w.shape[0])
    return _Plan(w, b, groups, stride_hw, padding_hw, code).run(x, residual, out, weights_are_private=False)


def pointwise(
    x,
    weight,
    bias=None,
    *,
    activation: Optional[str] = None,
    residual=None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """``activation(x @ weight.T + bias + residual)`` over any leading axes: (..., C) -> (..., K).

    The position-wise feed-forward form of a 1x1 convolution (Transformer FFN layers, SE blocks).
    ``weight`` is (K, C) (or (K, C, 1, 1)); other arguments as in :func:`conv1x1`. Leading axes
    that cannot be merged into three strided axes are copied for ``x`` and ``residual``; such an
    ``out`` is an error.
    """
    code = _activation_code(activation)
    w = _weight_matrix(weight, 1)
    b = _bias_vector(bias, w.shape[0])
    x = _float32_array("x", x)
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (the channels), got a scalar")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} channels (last axis) but weight expects {w.shape[1]}")
    shape = x.shape[:-1] + (w.shape[0],)
    residual_in = _check_residual(residual, shape)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    else:
        out = _check_out(out, shape)
        _check_no_overlap(out, residual_in, (("x", x), ("weight", w), ("bias", b)))
    out4 = _as_4d(out)
    if out4 is None:
        raise ValueError(f"out's leading axes (strides {out.strides}) cannot be viewed as 3 strided axes; "
                         "pass a C-contiguous out")
    x4 = _as_4d(_readable_copy(x))
    if x4 is None:
        x4 = _as_4d(np.ascontiguousarray(x))
    residual4 = None
    if residual_in is not None:
        if _same_view(out, residual_in):
            residual4 = out4
        else:
            residual4 = _as_4d(_readable_copy(residual_in))
            if residual4 is None:
                residual4 = _as_4d(np.ascontiguousarray(residual_in))
    packed = _core.PackedWeights(w, b, 1)
    packed.run(x4, out4, residual4, 1, 1, 0, 0, code)
    return out


class PointwiseConv:
    """A 1x1 convolution layer whose weights are packed once, at construction.

    ``layer(x, residual=None, out=None)`` computes the same as
    ``conv1x1(x, weight, bias, stride=..., padding=..., groups=..., activation=...)`` without
    re-packing the weights. Picklable: it pickles its (unpacked) weights and options.
    """

    def __init__(
        self,
        weight,
        bias=None,
        *,
        stride: IntPair = 1,
        padding: IntPair = 0,
        groups: int = 1,
        activation: Optional[str] = None,
    ) -> None:
        self._groups = _int("groups", groups, 1)
        self._stride = _pair("stride", stride, 1)
        self._padding = _pair("padding", padding, 0)
        self._activation = activation
        self._code = _activation_code(activation)
        w = np.array(_weight_matrix(weight, self._groups), dtype=np.float32, order="C", copy=True)
        b = _bias_vector(bias, w.shape[0])
        b = None if b is None else np.array(b, copy=True)
        w.flags.writeable = False
        if b is not None:
            b.flags.writeable = False
        self._plan = _Plan(w, b, self._groups, self._stride, self._padding, self._code)

    @property
    def in_channels(self) -> int:
        return self._plan.in_channels

    @property
    def out_channels(self) -> int:
        return self._plan.out_channels

    @property
    def stride(self) -> Tuple[int, int]:
        return self._stride

    @property
    def padding(self) -> Tuple[int, int]:
        return self._padding

    @property
    def groups(self) -> int:
        return self._groups

    @property
    def activation(self) -> Optional[str]:
        return self._activation

    @property
    def weight(self) -> np.ndarray:
        """The (K, C // groups) weights, read-only."""
        return self._plan.weight

    @property
    def bias(self) -> Optional[np.ndarray]:
        """The (K,) bias, read-only, or None."""
        return self._plan.bias

    @property
    def kernel(self) -> str:
        """Name of the microkernel the packed weights are laid out for."""
        return self._plan.packed.kernel

    def __call__(self, x, *, residual=None, out: Optional[np.ndarray] = None) -> np.ndarray:
        self._plan.repack_if_isa_changed()
        return self._plan.run(x, residual, out, weights_are_private=True)

    def __reduce__(self):
        options = (self._stride, self._padding, self._groups, self._activation)
        return (_rebuild_pointwise_conv, (self.weight, self.bias) + options)

    def __repr__(self) -> str:
        return (
            f"PointwiseConv(in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"stride={self._stride}, padding={self._padding}, groups={self._groups}, "
            f"activation={self._activation!r}, bias={self.bias is not None})"
        )


def _rebuild_pointwise_conv(weight, bias, stride, padding, groups, activation) -> PointwiseConv:
    return PointwiseConv(weight, bias, stride=stride, padding=padding, groups=groups, activation=activation)
