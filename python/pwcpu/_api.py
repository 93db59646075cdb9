"""The NumPy-facing API: argument checking and calls into the compiled core.

Every public function validates its arguments before any memory is touched and raises TypeError
(wrong type or dtype) or ValueError (wrong shape or value) with a message that names the argument.
The options and weights of a layer are checked here; the arrays of each call (x, residual, out)
are checked by the core's ConvPlan, on the hot path. Inputs whose layout the kernels cannot read
in place are copied; outputs never are: an ``out`` the kernels cannot write directly is an error,
so a result can never land in a temporary that the caller does not see.
"""

from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _core

__all__ = ["ACTIVATIONS", "PRECISIONS", "DepthwiseConv", "InvertedResidual", "PointwiseConv", "conv1x1", "depthwise_conv2d",
           "pointwise"]

#: Names accepted by ``activation=``, mapped to the core's codes.
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "hardswish": 5, "sigmoid": 6, "hardsigmoid": 7}

IntPair = Union[int, Tuple[int, int], Sequence[int]]

# Larger strides, paddings or group counts cannot describe a real layer and would overflow the
# core's 64-bit index arithmetic once multiplied together.
_MAX_GEOMETRY = 2**31 - 1



# ---- argument checking ---------------------------------------------------------------------


def _float32_array(name: str, value) -> np.ndarray:
    """``value`` as a float32 array (array-likes converted); other dtypes are a TypeError that says
    how to convert. The same check the core applies to each call's arrays."""
    return _core.as_float32(value, name)


def _int(name: str, value, minimum: int) -> int:
    """An integer argument: ints, NumPy integers and 0-d integer arrays (anything with __index__)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not minimum <= value <= _MAX_GEOMETRY:
        raise ValueError(f"{name} must be between {minimum} and {_MAX_GEOMETRY}, got {value}")
    return value


def _pair(name: str, value, minimum: int) -> Tuple[int, int]:
    if isinstance(value, (numbers.Integral, bool, np.bool_)) or (isinstance(value, np.ndarray) and value.ndim == 0):
        v = _int(name, value, minimum)
        return v, v
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}")
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair (height, width), got {len(value)} values")
    return _int(name, value[0], minimum), _int(name, value[1], minimum)


def _activation_code(activation, name: str = "activation") -> int:
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"{name} must be None or a string, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"{name} must be one of {names}; got {activation!r}")
    return ACTIVATIONS[activation]


#: Names accepted by ``precision=``, mapped to the core's codes.
PRECISIONS = {"fp32": 0, "bf16": 1, "int8": 2}


def _precision_code(precision) -> int:
    return _choice_code("precision", precision, PRECISIONS)


def _is_bfloat16(a) -> bool:
    """A NumPy array of ml_dtypes' bfloat16 (the dtype JAX and TensorFlow use), recognised without
    importing ml_dtypes."""
    return isinstance(a, np.ndarray) and a.dtype.name == "bfloat16"


def _has_bfloat16(*arrays) -> bool:
    return any(_is_bfloat16(a) for a in arrays)


def _run(compute, x, residual, out):
    """``compute(x, residual, out)``, float32 arrays straight through; where the core refuses the
    dtypes (TypeError, before it touches any memory) and some array is bfloat16, the bfloat16 path.
    The common call pays nothing for bfloat16: the dtypes are looked at only after a refusal."""
    try:
        return compute(x, residual, out)
    except TypeError:
        if not _has_bfloat16(x, residual, out):
            raise
    return _with_bfloat16_arrays(compute, x, residual, out)


def _with_bfloat16_arrays(compute, x, residual, out):
    """``compute`` on bfloat16 arrays: x and residual are widened to float32 (exactly), a bfloat16
    ``out`` receives the float32 result rounded to nearest even. (Where the kernels take bfloat16,
    ConvPlan.conv reads a 4-D bfloat16 x as it is, and writes a bfloat16 out without a residual,
    itself: the same values, without the copies.)"""
    if _is_bfloat16(x):
        x = x.astype(np.float32)
    if _is_bfloat16(residual):
        residual = residual.astype(np.float32)
    if not _is_bfloat16(out):
        return compute(x, residual, out)
    result = compute(x, residual, None)
    if out.shape != result.shape:
        raise ValueError(f"out must have shape {result.shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    np.copyto(out, result, casting="unsafe")  # float32 -> bfloat16 rounds to nearest even
    return out


_LAYOUTS = {"NHWC": 0, "NCHW": 1}


def _layout_code(layout) -> int:
    return _choice_code("layout", layout, _LAYOUTS)


def _choice_code(name: str, value, codes: dict) -> int:
    """The core's code for a string option (layout, precision): a TypeError for anything but a
    string, a ValueError for an unknown one."""
    names = [repr(c) for c in codes]
    choices = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {choices}, got {type(value).__name__}")
    if value not in codes:
        raise ValueError(f"{name} must be {choices}, got {value!r}")
    return codes[value]


def _weight_matrix(weight, groups: int, name: str = "weight") -> np.ndarray:
    """``weight`` as a (K, C // groups) float32 view: accepts (K, Cg) and PyTorch's (K, Cg, 1, 1)."""
    w = _float32_array(name, weight)
    if w.ndim == 4:
        if w.shape[2:] != (1, 1):
            raise ValueError(f"{name} must have a 1x1 kernel, (K, C // groups, 1, 1); got shape {w.shape}")
        w = w[:, :, 0, 0]
    elif w.ndim != 2:
        raise ValueError(f"{name} must have shape (K, C // groups) or (K, C // groups, 1, 1); got shape {w.shape}")
    if w.shape[0] % groups != 0:
        raise ValueError(f"groups={groups} must divide the output channels K={w.shape[0]}")
    return w


def _bias_vector(bias, out_channels: int, name: str = "bias") -> Optional[np.ndarray]:
    if bias is None:
        return None
    b = _float32_array(name, bias)
    if b.shape != (out_channels,):
        raise ValueError(f"{name} must have shape ({out_channels},) to match weight, got {b.shape}")
    return b


def _depthwise_filters(weight, name: str = "weight") -> np.ndarray:
    """``weight`` as (C, kh, kw) float32: accepts (C, kh, kw) and PyTorch's (C, 1, kh, kw)."""
    w = _float32_array(name, weight)
    if w.ndim == 4:
        if w.shape[1] != 1:
            raise ValueError(f"{name} must have one input channel per filter, (C, 1, kh, kw); got shape {w.shape}")
        w = w[:, 0]
    elif w.ndim != 3:
        raise ValueError(f"{name} must have shape (C, kh, kw) or (C, 1, kh, kw); got shape {w.shape}")
    if w.shape[1] < 1 or w.shape[2] < 1:
        raise ValueError(f"{name}'s kernel must be at least 1x1, got {w.shape[1]}x{w.shape[2]}")
    return w


def _dense_filters(weight, name: str = "weight") -> np.ndarray:
    """``weight`` as (K, C // groups, kh, kw) float32, PyTorch's layout for a dense convolution."""
    w = _float32_array(name, weight)
    if w.ndim != 4:
        raise ValueError(f"{name} must have shape (K, C // groups, kh, kw); got shape {w.shape}")
    if w.shape[2] < 1 or w.shape[3] < 1:
        raise ValueError(f"{name}'s kernel must be at least 1x1, got {w.shape[2]}x{w.shape[3]}")
    return w


# ---- the operations ------------------------------------------------------------------------


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
    layout: str = "NHWC",
    precision: str = "fp32",
) -> np.ndarray:
    """1x1 convolution of an NHWC (or NCHW) float32 tensor, with a fused epilogue.

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
    activation : None, "relu", "relu6", "silu", "gelu", "hardswish", "sigmoid" or "hardsigmoid"
        ``gelu`` is the exact (erf) form.
    residual : array_like, float32, output shape, optional
        Added after the bias and before the activation. May be ``out`` itself (in-place accumulate).
    out : ndarray, float32, output shape, optional
        Written in place and returned. Its channel axis must be contiguous; other strides are free,
        so it can be a channel slice of a larger buffer.
    layout : "NHWC" or "NCHW"
        With "NCHW", x is (N, C, H, W) and the result (N, K, Ho, Wo), computed directly as
        ``W[K, C] @ X[C, H*W]`` per image (no transposing copy). ``out`` and ``residual`` then need
        contiguous (H, W) planes (other strides are free); x may have any strides.
    precision : "fp32", "bf16" or "int8"
        With "bf16", x and weight are rounded to bfloat16 (to nearest, ties to even: pwcpu rounds
        float32 inputs itself) and their products summed in float32; bias, residual, activation
        and the result stay float32. x, residual and out may also be bfloat16 arrays (ml_dtypes,
        as JAX and TensorFlow make them), with any precision: inputs are widened exactly, and a
        bfloat16 out receives the float32 result rounded to nearest even.
        With "int8" (NHWC only), dynamic quantization: weights per output channel (symmetric int8),
        each pixel's channels with their own scale and zero point, exact int32 sums, float32
        result (see ``pwcpu.reference.quantize_int8_rows`` and the README's "Accuracy").

    Returns
    -------
    ndarray, float32, shape (N, Ho, Wo, K) (or (N, K, Ho, Wo) for NCHW)
    """
    groups = _int("groups", groups, 1)
    stride_hw = _pair("stride", stride, 1)
    padding_hw = _pair("padding", padding, 0)
    code = _activation_code(activation)
    layout_code = _layout_code(layout)
    precision_code = _precision_code(precision)
    w = _weight_matrix(weight, groups)
    b = _bias_vector(bias, w.shape[0])
    plan = _core.ConvPlan(w, b, groups, *stride_hw, *padding_hw, code, False, layout_code, precision_code)
    return _run(plan.conv, x, residual, out)


def pointwise(
    x,
    weight,
    bias=None,
    *,
    activation: Optional[str] = None,
    residual=None,
    out: Optional[np.ndarray] = None,
    precision: str = "fp32",
) -> np.ndarray:
    """``activation(x @ weight.T + bias + residual)`` over any leading axes: (..., C) -> (..., K).

    The position-wise feed-forward form of a 1x1 convolution (Transformer FFN layers, SE blocks).
    ``weight`` is (K, C) (or (K, C, 1, 1)); other arguments as in :func:`conv1x1`. Leading axes
    that cannot be merged into three strided axes are copied for ``x`` and ``residual``; such an
    ``out`` is an error.
    """
    code = _activation_code(activation)
    precision_code = _precision_code(precision)
    w = _weight_matrix(weight, 1)
    b = _bias_vector(bias, w.shape[0])
    plan = _core.ConvPlan(w, b, 1, 1, 1, 0, 0, code, False, 0, precision_code)
    return _run(plan.pointwise, x, residual, out)


def depthwise_conv2d(
    x,
    weight,
    bias=None,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    activation: Optional[str] = None,
    residual=None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Depthwise convolution of an NHWC float32 tensor: one kh x kw filter per channel.

    ``y[n, oh, ow, c] = activation(sum_ij x[n, oh*sh - ph + i, ow*sw - pw + j, c] * w[c, i, j]
    + bias[c] + residual)``, with zero padding, as PyTorch's ``conv2d(..., groups=C)``.

    Parameters
    ----------
    x : array_like, float32, shape (N, H, W, C)
        Views with a contiguous channel axis are read in place; others are copied first.
    weight : array_like, float32, shape (C, kh, kw) or (C, 1, kh, kw)
        Any kernel size; 3x3 and 5x5 are MobileNet's and EfficientNet's.
    bias : array_like, float32, shape (C,), optional
    stride, padding : int or (int, int)
        ``Ho = (H + 2*ph - kh) // sh + 1``.
    activation, residual, out
        As in :func:`conv1x1`.

    Returns
    -------
    ndarray, float32, shape (N, Ho, Wo, C)
    """
    stride_hw = _pair("stride", stride, 1)
    padding_hw = _pair("padding", padding, 0)
    code = _activation_code(activation)
    w = _depthwise_filters(weight)
    b = _bias_vector(bias, w.shape[0])
    return _core.DepthwisePlan(w, b, *stride_hw, *padding_hw, code, False).conv(x, residual, out)


def conv2d(
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
    """Dense convolution of an NHWC float32 tensor, as a network's stem or ResNet's 3x3 layers.

    ``y[n, oh, ow, k] = activation(sum_ijc x[n, oh*sh - ph + i, ow*sw - pw + j, c] * w[k, c, i, j]
    + bias[k] + residual)``, with zero padding, as PyTorch's ``conv2d`` (dilation 1); with
    ``groups``, output channel k sees only its group's C / groups input channels (ResNeXt, RegNet).
    Computed by the 1x1 kernels over im2col rows (each output pixel's kh x kw x C window), built
    a band of output rows at a time.

    Parameters
    ----------
    x : array_like, float32, shape (N, H, W, C)
        Views with a contiguous channel axis are read in place; others are copied first.
    weight : array_like, float32, shape (K, C // groups, kh, kw)
    bias : array_like, float32, shape (K,), optional
    stride, padding : int or (int, int)
        ``Ho = (H + 2*ph - kh) // sh + 1``.
    groups : int
        Divides C and K.
    activation, residual, out
        As in :func:`conv1x1`.

    Returns
    -------
    ndarray, float32, shape (N, Ho, Wo, K)
    """
    stride_hw = _pair("stride", stride, 1)
    padding_hw = _pair("padding", padding, 0)
    code = _activation_code(activation)
    w = _dense_filters(weight)
    b = _bias_vector(bias, w.shape[0])
    return _core.DenseConvPlan(w, b, *stride_hw, *padding_hw, code, False, _int("groups", groups, 1)).conv(x, residual, out)


class _LayerOptions:
    """The options every layer reports: stride, padding and activation."""

    _stride: Tuple[int, int]
    _padding: Tuple[int, int]
    _activation: Optional[str]

    @property
    def stride(self) -> Tuple[int, int]:
        return self._stride

    @property
    def padding(self) -> Tuple[int, int]:
        return self._padding

    @property
    def activation(self) -> Optional[str]:
        return self._activation


class _PackedLayer(_LayerOptions):
    """What the prepacked convolutions share: private weights and the call."""

    _weight: np.ndarray
    _bias: Optional[np.ndarray]

    @property
    def weight(self) -> np.ndarray:
        """The weights, read-only: (K, C // groups) for PointwiseConv, (C, kh, kw) for DepthwiseConv,
        (K, C, kh, kw) for DenseConv."""
        return self._weight

    @property
    def bias(self) -> Optional[np.ndarray]:
        """The bias, one per output channel, read-only, or None."""
        return self._bias

    @property
    def kernel(self) -> str:
        """Name of the microkernel the packed weights are laid out for."""
        return self._plan.kernel

    def __call__(self, x, *, residual=None, out: Optional[np.ndarray] = None) -> np.ndarray:
        return self._plan.conv(x, residual, out)


def _is_dask_array(x) -> bool:
    """A Dask array, recognised without importing Dask."""
    return type(x).__module__.startswith("dask.array") and hasattr(x, "__dask_graph__")


class PointwiseConv(_PackedLayer):
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
        layout: str = "NHWC",
        precision: str = "fp32",
    ) -> None:
        self._groups = _int("groups", groups, 1)
        self._layout = layout
        layout_code = _layout_code(layout)
        precision_code = _precision_code(precision)
        self._precision = precision
        self._stride = _pair("stride", stride, 1)
        self._padding = _pair("padding", padding, 0)
        self._activation = activation
        self._code = _activation_code(activation)
        w = _frozen_copy(_weight_matrix(weight, self._groups))
        b = _bias_vector(bias, w.shape[0])
        b = None if b is None else _frozen_copy(b)
        self._weight, self._bias = w, b
        self._plan = _core.ConvPlan(w, b, self._groups, *self._stride, *self._padding, self._code, True, layout_code,
                                    precision_code)

    @property
    def in_channels(self) -> int:
        return self._plan.in_channels

    @property
    def out_channels(self) -> int:
        return self._plan.out_channels

    @property
    def groups(self) -> int:
        return self._groups

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def precision(self) -> str:
        """"fp32"; "bf16": inputs and weights rounded to bfloat16, sums in float32; "int8": dynamic
        quantization, exact integer sums (see :func:`conv1x1`)."""
        return self._precision

    def __call__(self, x, *, residual=None, out: Optional[np.ndarray] = None):
        """The layer on x; a Dask array x gives a lazy Dask array (see :mod:`pwcpu.dask`). x,
        residual and out may be bfloat16 arrays, as in :func:`conv1x1`."""
        if _is_dask_array(x):
            if out is not None:
                raise ValueError("out= cannot be used with a Dask array: the result is a lazy Dask array")
            from . import dask as pwcpu_dask

            return pwcpu_dask.apply(self, x, residual=residual)
        # _run, written out: a function call less on the layer's hot path.
        try:
            return self._plan.conv(x, residual, out)
        except TypeError:
            if not _has_bfloat16(x, residual, out):
                raise
        return _with_bfloat16_arrays(self._plan.conv, x, residual, out)

    def __reduce__(self):
        options = (self._stride, self._padding, self._groups, self._activation, self._layout, self._precision)
        return (_rebuild_pointwise_conv, (self.weight, self.bias) + options)

    def __repr__(self) -> str:
        return (
            f"PointwiseConv(in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"stride={self._stride}, padding={self._padding}, groups={self._groups}, "
            f"activation={self._activation!r}, bias={self.bias is not None}, layout={self._layout!r}, "
            f"precision={self._precision!r})"
        )


def _frozen_copy(a: np.ndarray) -> np.ndarray:
    """A private copy that nobody can make writable again: its memory is an immutable bytes object,
    so the weights a layer reports (and pickles) are always the ones it packed."""
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.float32).reshape(a.shape)


def _rebuild_pointwise_conv(weight, bias, stride, padding, groups, activation, layout="NHWC",
                            precision="fp32") -> PointwiseConv:
    return PointwiseConv(weight, bias, stride=stride, padding=padding, groups=groups, activation=activation,
                         layout=layout, precision=precision)


class _WindowLayer(_PackedLayer):
    """What the prepacked kh x kw convolutions share: their options, frozen weights and bias, and
    the kernel's extent (the last two axes of the weight)."""

    def _init_window(self, filters: np.ndarray, bias, stride: IntPair, padding: IntPair, activation: Optional[str]):
        """Stores the options and frozen copies; returns the arguments every plan takes first."""
        self._stride = _pair("stride", stride, 1)
        self._padding = _pair("padding", padding, 0)
        self._activation = activation
        code = _activation_code(activation)
        w = _frozen_copy(filters)
        b = _bias_vector(bias, w.shape[0])
        self._weight, self._bias = w, None if b is None else _frozen_copy(b)
        return (self._weight, self._bias, *self._stride, *self._padding, code, True)

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return self._weight.shape[-2], self._weight.shape[-1]


class DepthwiseConv(_WindowLayer):
    """A depthwise convolution layer whose filters are packed once, at construction.

    ``layer(x, residual=None, out=None)`` computes the same as
    ``depthwise_conv2d(x, weight, bias, stride=..., padding=..., activation=...)``. Picklable.
    """

    def __init__(
        self,
        weight,
        bias=None,
        *,
        stride: IntPair = 1,
        padding: IntPair = 0,
        activation: Optional[str] = None,
    ) -> None:
        self._plan = _core.DepthwisePlan(*self._init_window(_depthwise_filters(weight), bias, stride, padding, activation))

    @property
    def channels(self) -> int:
        return self._plan.channels

    @property
    def in_channels(self) -> int:
        return self._plan.channels

    @property
    def out_channels(self) -> int:
        return self._plan.channels

    def __reduce__(self):
        return (_rebuild_depthwise_conv, (self.weight, self.bias, self._stride, self._padding, self._activation))

    def __repr__(self) -> str:
        kh, kw = self.kernel_size
        return (
            f"DepthwiseConv(channels={self.channels}, kernel_size=({kh}, {kw}), stride={self._stride}, "
            f"padding={self._padding}, activation={self._activation!r}, bias={self.bias is not None})"
        )


def _rebuild_depthwise_conv(weight, bias, stride, padding, activation) -> DepthwiseConv:
    return DepthwiseConv(weight, bias, stride=stride, padding=padding, activation=activation)


class DenseConv(_WindowLayer):
    """A dense convolution layer whose weights are packed once, at construction.

    ``layer(x, residual=None, out=None)`` computes the same as
    ``conv2d(x, weight, bias, stride=..., padding=..., groups=..., activation=...)``. Picklable.
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
        arguments = self._init_window(_dense_filters(weight), bias, stride, padding, activation)
        self._plan = _core.DenseConvPlan(*arguments, _int("groups", groups, 1))

    @property
    def in_channels(self) -> int:
        return self._plan.in_channels

    @property
    def out_channels(self) -> int:
        return self._plan.out_channels

    @property
    def groups(self) -> int:
        return self._plan.groups

    def __reduce__(self):
        return (_rebuild_dense_conv, (self.weight, self.bias, self._stride, self._padding, self.groups,
                                      self._activation))

    def __repr__(self) -> str:
        kh, kw = self.kernel_size
        return (
            f"DenseConv(in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size=({kh}, {kw}), "
            f"stride={self._stride}, padding={self._padding}, groups={self.groups}, activation={self._activation!r}, "
            f"bias={self.bias is not None})"
        )


def _rebuild_dense_conv(weight, bias, stride, padding, groups, activation) -> DenseConv:
    return DenseConv(weight, bias, stride=stride, padding=padding, groups=groups, activation=activation)


class InvertedResidual(_LayerOptions):
    """MobileNetV2's inverted residual block, fused into one call.

    ``y = project(depthwise(expand(x)))`` (+ ``x`` when ``residual``), each stage a convolution
    with its bias and activation: 1x1 expand (C -> E) + ``activation``, depthwise kh x kw (stride,
    padding) + ``activation``, 1x1 project (E -> K) + ``project_activation``. On large maps it is
    computed in bands of output rows: the expanded (E-channel) tensor is never written to memory
    whole, and each thread keeps its band's rows in cache. Where the 1x1 weights outweigh the
    activations (small maps, wide layers) the stages run in turn on whole tensors instead, as
    re-reading the weights for every band would cost more than it saves. Weights are taken with BatchNorm already folded in
    (:func:`fold_batchnorm`); ``expand_weight=None`` makes the block MobileNetV2's first one
    (depthwise straight on x, then project: with no wide tensor to keep in cache, the two run one
    after the other). ``residual=None`` adds the input whenever the shapes allow it
    (stride 1, "same" padding, K == C), as MobileNetV2 does.

    Squeeze-excitation (EfficientNet's MBConv, MobileNetV3), between the depthwise and project
    stages, is given by ``se_reduce_weight`` (S, E) and ``se_expand_weight`` (E, S) (PyTorch's
    ``fc1`` and ``fc2``, 1x1 weights (S, E, 1, 1) accepted) with their biases: each image's channel
    means of the depthwise output go through reduce + ``se_activation`` and expand + ``se_gate``,
    and the result scales the depthwise output's channels before the projection. The depthwise
    output is then computed whole (the means need all of it) and scaled band by band as it is
    projected.
    """

    def __init__(
        self,
        expand_weight,
        expand_bias,
        depthwise_weight,
        depthwise_bias,
        project_weight,
        project_bias=None,
        *,
        stride: IntPair = 1,
        padding: Optional[IntPair] = None,
        activation: Optional[str] = "relu6",
        project_activation: Optional[str] = None,
        residual: Optional[bool] = None,
        se_reduce_weight=None,
        se_reduce_bias=None,
        se_expand_weight=None,
        se_expand_bias=None,
        se_activation: Optional[str] = "silu",
        se_gate: Optional[str] = "sigmoid",
        precision: str = "fp32",
    ) -> None:
        precision_code = _precision_code(precision)
        dw = _frozen_copy(_depthwise_filters(depthwise_weight, "depthwise_weight"))
        hidden, kh, kw = dw.shape
        ew = None
        if expand_weight is not None:
            ew = _frozen_copy(_weight_matrix(expand_weight, 1, "expand_weight"))
            if ew.shape[0] != hidden:
                raise ValueError(f"expand_weight has {ew.shape[0]} output channels but depthwise_weight has {hidden} filters")
        elif expand_bias is not None:
            raise ValueError("expand_bias given without expand_weight")
        pw = _frozen_copy(_weight_matrix(project_weight, 1, "project_weight"))
        if pw.shape[1] != hidden:
            raise ValueError(f"project_weight takes {pw.shape[1]} channels but depthwise_weight has {hidden} filters")
        in_channels = hidden if ew is None else ew.shape[1]
        biases = [_bias_vector(b, n, name) for name, b, n in (
            ("expand_bias", expand_bias, hidden), ("depthwise_bias", depthwise_bias, hidden),
            ("project_bias", project_bias, pw.shape[0]))]
        biases = [None if b is None else _frozen_copy(b) for b in biases]
        self._stride = _pair("stride", stride, 1)
        self._padding = (kh // 2, kw // 2) if padding is None else _pair("padding", padding, 0)
        codes = (_activation_code(activation), _activation_code(project_activation, "project_activation"))
        same = self._stride == (1, 1) and self._padding == ((kh - 1) // 2, (kw - 1) // 2) and kh % 2 == 1 \
            and kw % 2 == 1 and pw.shape[0] == in_channels
        if residual is None:
            residual = same
        elif not isinstance(residual, (bool, np.bool_)):
            raise TypeError(f"residual must be None or a bool, got {type(residual).__name__}")
        elif residual and not same:
            raise ValueError("residual=True needs stride 1, 'same' padding (odd kernel, padding k // 2) and "
                             "out_channels == in_channels")
        self._activation, self._project_activation, self._residual = activation, project_activation, bool(residual)
        self._weights = (ew, biases[0], dw, biases[1], pw, biases[2])
        self._excitation = _excitation(hidden, se_reduce_weight, se_reduce_bias, se_expand_weight, se_expand_bias)
        self._se_activation, self._se_gate = se_activation, se_gate
        se_codes = (_activation_code(se_activation, "se_activation"), _activation_code(se_gate, "se_gate"))
        self._precision = precision
        self._plan = _core.BlockPlan(ew, biases[0], dw, biases[1], pw, biases[2], *self._stride, *self._padding,
                                     codes[0], codes[0], codes[1], self._residual, *self._excitation, *se_codes,
                                     precision_code)

    @property
    def in_channels(self) -> int:
        return self._plan.in_channels

    @property
    def out_channels(self) -> int:
        return self._plan.out_channels

    @property
    def residual(self) -> bool:
        return self._residual

    @property
    def precision(self) -> str:
        """Of the 1x1 stages (see :func:`conv1x1`); the depthwise stage computes in float32."""
        return self._precision

    def __call__(self, x, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        return self._plan.conv(x, out)

    @property
    def se_channels(self) -> int:
        """S, the squeeze-excitation's reduced width; 0 without squeeze-excitation."""
        return 0 if self._excitation[0] is None else self._excitation[0].shape[0]

    def __reduce__(self):
        reduce_w, reduce_b, expand_w, expand_b = self._excitation
        options = dict(stride=self._stride, padding=self._padding, activation=self._activation,
                       project_activation=self._project_activation, residual=self._residual,
                       se_reduce_weight=reduce_w, se_reduce_bias=reduce_b, se_expand_weight=expand_w,
                       se_expand_bias=expand_b, se_activation=self._se_activation, se_gate=self._se_gate,
                       precision=self._precision)
        return (_rebuild_inverted_residual, (self._weights, options))

    def __repr__(self) -> str:
        hidden, kh, kw = self._weights[2].shape
        se = f", se_channels={self.se_channels}" if self.se_channels else ""
        return (f"InvertedResidual(in_channels={self.in_channels}, hidden_channels={hidden}, "
                f"out_channels={self.out_channels}, kernel_size=({kh}, {kw}), stride={self._stride}, "
                f"activation={self._activation!r}, residual={self._residual}{se}, precision={self._precision!r})")


def _excitation(hidden: int, reduce_weight, reduce_bias, expand_weight, expand_bias) -> tuple:
    """The squeeze-excitation operands, checked and frozen: (S, E), S, (E, S), E; all None without."""
    if reduce_weight is None and expand_weight is None:
        if reduce_bias is not None or expand_bias is not None:
            raise ValueError("se_reduce_bias / se_expand_bias given without the squeeze-excitation weights")
        return (None, None, None, None)
    if reduce_weight is None or expand_weight is None:
        raise ValueError("squeeze-excitation needs both se_reduce_weight and se_expand_weight")
    reduce_w = _frozen_copy(_weight_matrix(reduce_weight, 1, "se_reduce_weight"))
    expand_w = _frozen_copy(_weight_matrix(expand_weight, 1, "se_expand_weight"))
    squeezed = reduce_w.shape[0]
    if reduce_w.shape[1] != hidden:
        raise ValueError(f"se_reduce_weight takes {reduce_w.shape[1]} channels but depthwise_weight has {hidden} filters")
    if expand_w.shape != (hidden, squeezed):
        raise ValueError(f"se_expand_weight must have shape ({hidden}, {squeezed}) to match se_reduce_weight, "
                         f"got {expand_w.shape}")
    reduce_b, expand_b = (None if b is None else _frozen_copy(_bias_vector(b, n, name)) for name, b, n in (
        ("se_reduce_bias", reduce_bias, squeezed), ("se_expand_bias", expand_bias, hidden)))
    return (reduce_w, reduce_b, expand_w, expand_b)


def _rebuild_inverted_residual(weights, options) -> InvertedResidual:
    return InvertedResidual(*weights, **options)


class DepthwiseSeparable(_LayerOptions):
    """MobileNetV1's depthwise-separable block in one call: depthwise kh x kw (stride, padding) +
    ``activation``, then 1x1 (C -> K) + ``pointwise_activation``.

    Weights are taken with BatchNorm already folded in (:func:`fold_batchnorm`); ``padding=None``
    is "same" (``k // 2``). It is an :class:`InvertedResidual` without expansion and without the
    input added: with no wide tensor to keep in cache, its two layers run one after the other.
    """

    def __init__(
        self,
        depthwise_weight,
        depthwise_bias,
        pointwise_weight,
        pointwise_bias=None,
        *,
        stride: IntPair = 1,
        padding: Optional[IntPair] = None,
        activation: Optional[str] = "relu",
        pointwise_activation: Optional[str] = "relu",
    ) -> None:
        # Checked here, so that errors name this class's arguments.
        filters = _depthwise_filters(depthwise_weight, "depthwise_weight")
        pointwise_weight = _weight_matrix(pointwise_weight, 1, "pointwise_weight")
        if pointwise_weight.shape[1] != filters.shape[0]:
            raise ValueError(f"pointwise_weight takes {pointwise_weight.shape[1]} channels but depthwise_weight has "
                             f"{filters.shape[0]} filters")
        pointwise_bias = _bias_vector(pointwise_bias, pointwise_weight.shape[0], "pointwise_bias")
        self._block = InvertedResidual(None, None, filters, depthwise_bias, pointwise_weight, pointwise_bias,
                                       stride=stride, padding=padding, activation=activation,
                                       project_activation=pointwise_activation, residual=False)
        self._stride, self._padding, self._activation = self._block.stride, self._block.padding, activation
        self._pointwise_activation = pointwise_activation

    @property
    def in_channels(self) -> int:
        return self._block.in_channels

    @property
    def out_channels(self) -> int:
        return self._block.out_channels

    @property
    def pointwise_activation(self) -> Optional[str]:
        return self._pointwise_activation

    def __call__(self, x, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        return self._block(x, out=out)

    def __reduce__(self):
        options = dict(stride=self._stride, padding=self._padding, activation=self._activation,
                       pointwise_activation=self._pointwise_activation)
        return (_rebuild_depthwise_separable, (self._block._weights[2:], options))

    def __repr__(self) -> str:
        _, kh, kw = self._block._weights[2].shape
        return (f"DepthwiseSeparable(in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size=({kh}, {kw}), stride={self._stride}, activation={self._activation!r}, "
                f"pointwise_activation={self._pointwise_activation!r})")


def _rebuild_depthwise_separable(weights, options) -> DepthwiseSeparable:
    return DepthwiseSeparable(*weights, **options)
