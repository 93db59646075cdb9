"""PyTorch bridge (optional: ``import pwcpu`` never needs torch).

- ``torch.ops.pwcpu.conv1x1`` and ``torch.ops.pwcpu.pointwise``: custom operators with fake (meta)
  implementations, so models that call them survive ``torch.compile`` and ``torch.export``.
  ``conv1x1`` takes PyTorch's NCHW shapes (a channels_last tensor reaches the kernels without a
  copy, and the result is channels_last); ``pointwise`` is ``nn.Linear``'s (..., C) -> (..., K).
- ``PwcpuConv2d`` and ``PwcpuLinear``: inference modules holding their weights packed (a folded
  BatchNorm and an activation included). Eager calls go straight to the kernels; under
  ``torch.compile`` and ``torch.export`` they call the operators.
- ``PwcpuDepthwiseConv2d`` and ``PwcpuDenseConv2d``: the same for depthwise convolutions
  (``groups == C``, any kernel size) and dense ones (a stem, a 3x3 layer); under ``torch.compile``
  and ``torch.export`` they run PyTorch's ``conv2d`` on the same weights.
- ``convert(model)``: an inference copy of a model in which every eligible 1x1 ``nn.Conv2d`` and
  ``nn.Linear`` (with a BatchNorm2d and an activation directly following it in a ``Sequential``)
  runs on pwcpu, and, where the model can be traced, its depthwise convolutions, stems and deep
  dense layers too; straight runs of converted layers then run as one ``PwcpuChain``, whose
  intermediate outputs reuse two buffers from call to call; ShuffleNet's channel shuffles (with
  the concatenation before them) become one NHWC pass, ``channel_shuffle``, and global average
  pooling another (``adaptive_avg_pool_to_one``, ``mean_over_pixels``).

Converted modules are frozen, as ``torch.jit.freeze`` freezes: their weights are packed once and
are reached only through copies (``module.weight`` returns one), so no write through ``.data``,
``.numpy()`` or ``torch.from_numpy`` can leave the packed weights stale. New weights go in by
assignment (``module.weight = w``) or ``load_state_dict``, which re-pack.
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import math
import operator
import threading
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.weak import WeakIdKeyDictionary

from . import _core
from ._api import DenseConv, DepthwiseConv, InvertedResidual, PointwiseConv, _precision_code
from ._block import fold_batchnorm

__all__ = ["PwcpuBatchNorm2d", "PwcpuChain", "PwcpuConv2d", "PwcpuConversionWarning", "PwcpuDenseConv2d",
           "PwcpuDepthwiseConv2d", "PwcpuInvertedResidual", "PwcpuLinear", "PwcpuSequential",
           "adaptive_avg_pool_to_one", "channel_shuffle", "conv1x1", "convert", "mean_over_pixels",
           "pointwise"]

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                       nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}


# The activations as PyTorch computes them, for the paths PyTorch takes.
_TORCH_ACTIVATIONS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
                      "hardswish": F.hardswish, "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


def _activation_name(module: nn.Module) -> Optional[str]:
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else None
    return _ACTIVATION_MODULES.get(type(module))


class PwcpuConversionWarning(UserWarning):
    """A layer that ``convert`` had to leave to PyTorch."""


# ---- the operators -------------------------------------------------------------------------

# The converted modules' private weight tensors (see _FrozenLayer), mapped to their modules: the
# operators use a module's packed layer for them and pack any other weight on every call, so a
# write that PyTorch's version counter does not see (through .data or .numpy()) can never leave a
# cached packing stale. Entries go with their tensors.
_private_weights = WeakIdKeyDictionary()  # by identity: tensors do not compare as dictionary keys


def _layer_for(weight: Tensor, bias: Optional[Tensor], options: tuple) -> PointwiseConv:
    owner = _private_weights.get(weight)
    module = owner() if owner is not None else None
    if module is not None and module._options == options and module._traced_bias is bias:
        return module._layer
    w = weight.detach().reshape(weight.shape[0], -1).numpy()
    b = None if bias is None else bias.detach().numpy()
    stride, padding, groups, activation, precision = options
    return PointwiseConv(w, b, stride=stride, padding=padding, groups=groups, activation=activation,
                         precision=precision)


def _check_operands(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    x_dims: Optional[int], x_form: str) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {t.dtype}; convert it with {name}.float()")
        if t.device.type != "cpu":
            raise TypeError(f"{op}: {name} must be on the CPU, got device {t.device}")
    if (x.dim() != x_dims) if x_dims is not None else x.dim() < 1:
        raise ValueError(f"{op}: x must have shape {x_form}, got {tuple(x.shape)}")


def _output_hw(x: Tensor, stride: Sequence[int], padding: Sequence[int],
               kernel: Sequence[int] = (1, 1)) -> Tuple[int, int]:
    """(Ho, Wo) of a convolution of NCHW-shaped x with zero padding."""
    return tuple(max((x.shape[2 + d] + 2 * padding[d] - kernel[d]) // stride[d] + 1, 0) for d in (0, 1))


def _new_output(size: Sequence[int], stride: Optional[Sequence[int]] = None) -> Tensor:
    """A float32 tensor of ``size`` (contiguous, or of ``stride``) for a converted layer's result,
    on pwcpu's output buffers: the most recently freed ones are reused, so a model's layers write
    memory that is in cache and mapped, where ``torch.empty`` often hands out memory the caches
    lost long ago, or pages to fault in afresh (a converted MobileNetV2 faulted 60-430 pages per
    call with it, none with these)."""
    if stride is None:
        count = math.prod(size)
        return torch.from_numpy(_core.output_array(count)).view(tuple(size))
    count = 1 + sum((extent - 1) * step for extent, step in zip(size, stride)) if all(size) else 0
    return torch.from_numpy(_core.output_array(count)).as_strided(tuple(size), tuple(stride))


def _run_conv(layer, x: Tensor, residual: Optional[Tensor], kernel: Tuple[int, int] = (1, 1)) -> Tensor:
    """A prepacked convolution (PointwiseConv, DepthwiseConv, DenseConv) on tensor memory:
    NCHW-shaped x (channels_last is read in place, plain NCHW copied to NHWC), result channels_last."""
    ho, wo = _output_hw(x, layer.stride, layer.padding, kernel)
    out = _new_output((x.shape[0], ho, wo, layer.out_channels))
    if x.shape[1] == layer.in_channels and (residual is None or residual.shape == (x.shape[0], layer.out_channels,
                                                                                   ho, wo)):
        # Straight to the kernels when the channels are contiguous: no NumPy views on the way.
        if layer._plan.conv_channels_last(x.data_ptr(), x.shape, x.stride(), out.data_ptr(),
                                          0 if residual is None else residual.data_ptr(),
                                          None if residual is None else residual.stride()):
            return out.permute(0, 3, 1, 2)
    res = None if residual is None else residual.detach().permute(0, 2, 3, 1).numpy()
    layer(x.detach().permute(0, 2, 3, 1).numpy(), residual=res, out=out.numpy())
    return out.permute(0, 3, 1, 2)


def _run_pointwise(layer: PointwiseConv, x: Tensor, residual: Optional[Tensor]) -> Tensor:
    out = _new_output(tuple(x.shape[:-1]) + (layer.out_channels,))
    layer._plan.pointwise(x.detach().numpy(), None if residual is None else residual.detach().numpy(), out.numpy())
    return out


@torch.library.custom_op(
    "pwcpu::conv1x1", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias=None, SymInt[2] stride=1, SymInt[2] padding=0, SymInt groups=1, "
           "str? activation=None, Tensor? residual=None, str precision=\"fp32\") -> Tensor")
def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Sequence[int] = (1, 1),
            padding: Sequence[int] = (0, 0), groups: int = 1, activation: Optional[str] = None,
            residual: Optional[Tensor] = None, precision: str = "fp32") -> Tensor:
    """1x1 convolution of an NCHW-shaped float32 CPU tensor: ``act(conv(x) + bias + residual)``
    (``precision`` as in :func:`pwcpu.conv1x1`)."""
    _check_operands("pwcpu::conv1x1", x, weight, bias, residual, 4, "(N, C, H, W)")
    if weight.dim() not in (2, 4):
        raise ValueError(f"pwcpu::conv1x1: weight must have shape (K, C // groups, 1, 1) or (K, C // groups), "
                         f"got {tuple(weight.shape)}")
    layer = _layer_for(weight, bias, (tuple(stride), tuple(padding), groups, activation, precision))
    return _run_conv(layer, x, residual)


@conv1x1.register_fake
def _(x, weight, bias=None, stride=(1, 1), padding=(0, 0), groups=1, activation=None, residual=None,
      precision="fp32"):
    ho, wo = _output_hw(x, stride, padding)
    return x.new_empty((x.shape[0], ho, wo, weight.shape[0])).permute(0, 3, 1, 2)


@torch.library.custom_op(
    "pwcpu::pointwise", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias=None, str? activation=None, Tensor? residual=None, "
           "str precision=\"fp32\") -> Tensor")
def pointwise(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
              residual: Optional[Tensor] = None, precision: str = "fp32") -> Tensor:
    """``act(x @ weight.T + bias + residual)`` over any leading axes, as ``nn.Linear`` computes."""
    _check_operands("pwcpu::pointwise", x, weight, bias, residual, None, "(..., C)")
    if weight.dim() != 2:
        raise ValueError(f"pwcpu::pointwise: weight must have shape (K, C), got {tuple(weight.shape)}")
    layer = _layer_for(weight, bias, ((1, 1), (0, 0), 1, activation, precision))
    return _run_pointwise(layer, x, residual)


@pointwise.register_fake
def _(x, weight, bias=None, activation=None, residual=None, precision="fp32"):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


# ---- the modules ---------------------------------------------------------------------------


def _eager(x) -> bool:
    """Whether a call may go straight to the kernels: a plain tensor outside any tracing."""
    return type(x) is Tensor and not torch.compiler.is_compiling()


def _plain_operand(t, dims: Optional[int]) -> bool:
    """The common case, tested fast: a float32 CPU tensor of the expected rank."""
    return (type(t) is Tensor and t.dtype is torch.float32 and t.device.type == "cpu"
            and (t.dim() == dims if dims is not None else t.dim() >= 1))


def _kernel_input(t) -> bool:
    """A tensor the kernels may read and nothing has to record: a plain float32 CPU tensor, no
    gradient wanted of it (the caller also checks that no tracing is under way)."""
    return (type(t) is Tensor and t.dtype is torch.float32 and t.is_cpu
            and not (t.requires_grad and torch.is_grad_enabled()))


def _check_inference(op: str, *tensors: Optional[Tensor]) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op} is an inference module (converted by pwcpu) and computes no gradients; "
                           "call it under torch.no_grad() or torch.inference_mode(), or train the original model")


def _as_float32_array(value) -> np.ndarray:
    return np.asarray(value.detach() if isinstance(value, Tensor) else value, dtype=np.float32)


def _fast_lane(plan, geometries: Dict[torch.Size, tuple], x) -> Optional[Tensor]:
    """The common call, with nothing on the way that costs more than it must: a plain float32 CPU
    tensor of a shape run before (its output's size and strides in ``geometries``), channels_last,
    no gradients, no tracing, straight to the plan; else None."""
    if _kernel_input(x) and not torch.compiler.is_compiling():
        geometry = geometries.get(x.shape)
        if geometry is not None:
            out = _new_output(*geometry)
            if plan.conv_channels_last(x.data_ptr(), x.shape, x.stride(), out.data_ptr(), 0, None):
                return out
    return None


# Bumped by every change of any converted module's state: what was derived from the state (a
# fused block) is still current while this has not moved, a test that costs one comparison.
_state_changes = [0]


class _FrozenModule(nn.Module):
    """A module whose state is private: reads return copies and writes (assignment,
    ``load_state_dict``) go through ``_install``, which bumps ``_generation`` so that anything
    derived from the state (packed weights, fused layers) knows to rebuild."""

    _generation = 0

    def _touch(self) -> None:
        object.__setattr__(self, "_generation", self._generation + 1)
        _state_changes[0] += 1

    def _state_names(self) -> Tuple[str, ...]:
        raise NotImplementedError

    def _set_state(self, values: Dict[str, Optional[np.ndarray]]) -> None:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name in self._state_names():
            value = getattr(self, name)
            if value is not None:
                destination[prefix + name] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        names = [name for name in self._state_names() if getattr(self, name) is not None]
        missing = [prefix + name for name in names if prefix + name not in state_dict]
        missing_keys.extend(missing)
        if missing:
            return
        try:
            self._set_state({name: _as_float32_array(state_dict[prefix + name]) for name in names})
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{prefix}: {e}")


class _FrozenLayer(_FrozenModule):
    """What PwcpuConv2d and PwcpuLinear share: weights kept in private tensors (saved and loaded as
    ``weight`` and ``bias``, read as copies) and packed for the kernels on first use."""

    def _init_layer(self, weight, bias, options: tuple) -> None:
        object.__setattr__(self, "_options", options)  # (stride, padding, groups, activation, precision)
        self._set_state({"weight": _as_float32_array(weight), "bias": None if bias is None else _as_float32_array(bias)})

    def _state_names(self) -> Tuple[str, ...]:
        return ("weight", "bias")

    def _pack(self, w: np.ndarray, b: Optional[np.ndarray]):
        """The NumPy-level layer for these weights and the module's options."""
        w = w.reshape(w.shape[0], -1) if w.ndim == 4 else w
        stride, padding, groups, activation, precision = self._options
        return PointwiseConv(w, b, stride=stride, padding=padding, groups=groups, activation=activation,
                             precision=precision)

    def _set_state(self, values: Dict[str, Optional[np.ndarray]]) -> None:
        w, b = values["weight"], values.get("bias")
        layer = self._pack(w, b)
        object.__setattr__(self, "_packed", layer)
        # Private tensors of the same values, for the operators' path under torch.compile and
        # torch.export (never saved: ``weight`` and ``bias`` are).
        self.register_buffer("_traced_weight", torch.tensor(np.asarray(layer.weight)), persistent=False)
        self.register_buffer("_traced_bias", None if b is None else torch.tensor(np.asarray(layer.bias)),
                             persistent=False)
        _private_weights[self._traced_weight] = weakref.ref(self)
        self._touch()

    @property
    def _layer(self) -> PointwiseConv:
        layer = self.__dict__.get("_packed")
        if layer is None:  # an unpickled module: pack again
            self._set_state({"weight": self._traced_weight.numpy(), "bias": None if self._traced_bias is None
                             else self._traced_bias.numpy()})
            layer = self._packed
        return layer

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_packed", None)  # packed again where it is needed
        if "_output_geometry" in state:
            state["_output_geometry"] = {}  # the fast lane opens again after the first (packing) call
        return state

    def _weight_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """A copy of the weights the layer computes with (writing to it changes nothing)."""
        w = self._traced_weight
        return w.clone().reshape(self._weight_shape(tuple(w.shape)))

    @weight.setter
    def weight(self, value) -> None:
        self._set_state({"weight": _as_float32_array(value), "bias": None if self._traced_bias is None
                         else self._traced_bias.numpy()})

    @property
    def bias(self) -> Optional[Tensor]:
        """A copy of the bias, or None."""
        return None if self._traced_bias is None else self._traced_bias.clone()

    @bias.setter
    def bias(self, value) -> None:
        self._set_state({"weight": self._traced_weight.numpy(), "bias": None if value is None
                         else _as_float32_array(value)})

    @property
    def activation(self) -> Optional[str]:
        return self._options[3]

    @property
    def precision(self) -> str:
        """"fp32", "bf16" (inputs and weights rounded to bfloat16, float32 sums) or "int8" (dynamic
        quantization): see pwcpu.conv1x1."""
        return self._options[4]

    def _bfloat16_call(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """A call on bfloat16 tensors, as PyTorch returns them: computed on the values widened to
        float32 (exactly), the result rounded back to bfloat16."""
        y = self(x.float(), None if residual is None else residual.float())
        return y.to(torch.bfloat16)


class _ConvolutionLayer(_FrozenLayer):
    """A frozen layer with a convolution's geometry, and the eager fast lane its calls share."""

    def _init_layer(self, weight, bias, options: tuple) -> None:
        # Input shape -> output (size, stride), for the eager path's fast lane (shapes it has run).
        object.__setattr__(self, "_output_geometry", {})
        super()._init_layer(weight, bias, options)

    def _known_shape_call(self, x) -> Optional[Tensor]:
        packed = self.__dict__.get("_packed")  # absent in an unpickled module until it packs again
        return None if packed is None else _fast_lane(packed._plan, self._output_geometry, x)

    def _remember_shape(self, x: Tensor, out: Tensor) -> None:
        """x's shape ran and gave out: take the fast lane for it from now on."""
        if len(self._output_geometry) < 64:
            self._output_geometry[x.shape] = (tuple(out.shape), out.stride())

    @property
    def stride(self) -> Tuple[int, int]:
        return self._options[0]

    @property
    def padding(self) -> Tuple[int, int]:
        return self._options[1]


class PwcpuConv2d(_ConvolutionLayer):
    """An inference 1x1 convolution (BatchNorm folded in, activation fused) run by pwcpu."""

    def __init__(self, weight, bias, stride=(1, 1), padding=(0, 0), groups: int = 1,
                 activation: Optional[str] = None, precision: str = "fp32") -> None:
        super().__init__()
        _precision_code(precision)
        self._init_layer(weight, bias, (_pair(stride), _pair(padding), int(groups), activation, precision))

    def _weight_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        return shape + (1, 1)

    @property
    def groups(self) -> int:
        return self._options[2]

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None,
                     activation: Optional[str] = None, precision: str = "fp32") -> "PwcpuConv2d":
        weight = _as_float32_array(conv.weight)
        bias = None if conv.bias is None else _as_float32_array(conv.bias)
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, *_batchnorm_state(bn), bn.eps)
        return cls(weight, bias, conv.stride, conv.padding, conv.groups, activation, precision)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        out = self._known_shape_call(x) if residual is None else None
        return out if out is not None else self._forward(x, residual)

    def _forward(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        if type(x) is not Tensor or torch.compiler.is_compiling():
            return torch.ops.pwcpu.conv1x1(x, self._traced_weight, self._traced_bias, list(self.stride),
                                           list(self.padding), self.groups, self.activation, residual, self.precision)
        _check_inference("PwcpuConv2d", x, residual)
        if x.dtype is torch.bfloat16:
            return self._bfloat16_call(x, residual)
        if not _plain_operand(x, 4):
            _check_operands("PwcpuConv2d", x, self._traced_weight, None, None, 4, "(N, C, H, W)")
        if residual is not None and (not _plain_operand(residual, 4) or residual.shape != (
                x.shape[0], self._traced_weight.shape[0]) + _output_hw(x, self.stride, self.padding)):
            # What the graph added to the convolution may broadcast or promote: PyTorch computes it.
            weight = self._traced_weight.reshape(self._weight_shape(tuple(self._traced_weight.shape)))
            y = F.conv2d(x, weight, self._traced_bias, self.stride, self.padding, 1, self.groups) + residual
            return _TORCH_ACTIVATIONS[self.activation](y)
        out = _run_conv(self._layer, x, residual)
        if residual is None:
            self._remember_shape(x, out)
        return out

    def _bfloat16_call(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """Where the layer's kernels read bfloat16 (precision "bf16" on CPUs with a bfloat16 dot
        product or AMX), x's memory is read as it is, without the widening copy; else as the base."""
        plan = self._layer._plan
        if x.dim() != 4 or not plan.reads_bfloat16:
            return super()._bfloat16_call(x, residual)
        bits = x.permute(0, 2, 3, 1).view(torch.int16).numpy().view(np.uint16)  # NHWC, in place
        if residual is None:  # the kernels store bfloat16 too
            y = torch.empty((x.shape[0],) + _output_hw(x, self.stride, self.padding) + (plan.out_channels,),
                            dtype=torch.bfloat16)
            plan.conv_bfloat16_into(bits, y.view(torch.int16).numpy().view(np.uint16))
            return y.permute(0, 3, 1, 2)
        y = plan.conv_bfloat16(bits, residual.float().permute(0, 2, 3, 1).numpy(), None)
        return torch.from_numpy(y).permute(0, 3, 1, 2).to(torch.bfloat16)

    def extra_repr(self) -> str:
        k, cg = self._traced_weight.shape
        return (f"{cg * self.groups}, {k}, stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"activation={self.activation!r}" + (f", precision={self.precision!r}" if self.precision != "fp32" else ""))


class PwcpuLinear(_FrozenLayer):
    """An inference ``nn.Linear`` (activation fused) run by pwcpu over any leading axes."""

    def __init__(self, weight, bias, activation: Optional[str] = None, precision: str = "fp32") -> None:
        super().__init__()
        _precision_code(precision)
        self._init_layer(weight, bias, ((1, 1), (0, 0), 1, activation, precision))

    def _weight_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        return shape

    @property
    def in_features(self) -> int:
        return self._traced_weight.shape[1]

    @property
    def out_features(self) -> int:
        return self._traced_weight.shape[0]

    @classmethod
    def from_module(cls, linear: nn.Linear, activation: Optional[str] = None, precision: str = "fp32") -> "PwcpuLinear":
        return cls(linear.weight, linear.bias, activation, precision)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if not _eager(x):
            return torch.ops.pwcpu.pointwise(x, self._traced_weight, self._traced_bias, self.activation, residual,
                                             self.precision)
        _check_inference("PwcpuLinear", x, residual)
        if x.dtype is torch.bfloat16:
            return self._bfloat16_call(x, residual)
        if not _plain_operand(x, None):
            _check_operands("PwcpuLinear", x, self._traced_weight, None, None, None, "(..., C)")
        if residual is not None and (not _plain_operand(residual, None) or
                                     residual.shape != x.shape[:-1] + (self._traced_weight.shape[0],)):
            y = F.linear(x, self._traced_weight, self._traced_bias) + residual  # broadcasts or promotes: PyTorch's
            return _TORCH_ACTIVATIONS[self.activation](y)
        return _run_pointwise(self._layer, x, residual)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation!r}"
                + (f", precision={self.precision!r}" if self.precision != "fp32" else ""))


class _WindowLayer(_ConvolutionLayer):
    """A frozen kh x kw convolution (BatchNorm folded in, activation and residual fused) run by
    pwcpu on channels_last memory. Under ``torch.compile`` or ``torch.export``, and for autograd,
    the same weights run through PyTorch's ``conv2d``."""

    def __init__(self, weight, bias, stride=(1, 1), padding=(0, 0), activation: Optional[str] = None) -> None:
        super().__init__()
        self._init_layer(weight, bias, (_pair(stride), _pair(padding), 1, activation, "fp32"))

    @classmethod
    def from_module(cls, conv: nn.Conv2d, activation: Optional[str] = None):
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, activation)

    def _torch_groups(self) -> int:
        raise NotImplementedError

    def _torch_forward(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        weight = self._traced_weight.reshape(self._weight_shape(tuple(self._traced_weight.shape)))
        y = F.conv2d(x, weight, self._traced_bias, self.stride, self.padding, 1, self._torch_groups())
        return _TORCH_ACTIVATIONS[self.activation](y if residual is None else y + residual)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        out = self._known_shape_call(x) if residual is None else None
        return out if out is not None else self._forward(x, residual)

    def _forward(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        if not _eager(x) or (torch.is_grad_enabled() and (x.requires_grad or (residual is not None
                                                                                and residual.requires_grad))):
            return self._torch_forward(x, residual)
        if not _plain_operand(x, 4):
            _check_operands(type(self).__name__, x, self._traced_weight, None, None, 4, "(N, C, H, W)")
        layer = self._layer
        if residual is not None and (not _plain_operand(residual, 4) or residual.shape != (
                x.shape[0], layer.out_channels) + _output_hw(x, self.stride, self.padding, layer.kernel_size)):
            return self._torch_forward(x, residual)  # what the graph adds may broadcast or promote
        out = _run_conv(layer, x, residual, layer.kernel_size)
        if residual is None:
            self._remember_shape(x, out)
        return out

    def _pack(self, w: np.ndarray, b: Optional[np.ndarray]):
        stride, padding, _, activation, _ = self._options
        return self._numpy_layer(w, b, stride=stride, padding=padding, activation=activation)


class PwcpuDepthwiseConv2d(_WindowLayer):
    """An inference depthwise ``nn.Conv2d`` (``groups == in_channels == out_channels``) run by
    pwcpu; see the base class for the paths PyTorch takes."""

    _numpy_layer = DepthwiseConv

    def _weight_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        return (shape[0], 1) + shape[1:]

    def _torch_groups(self) -> int:
        return self._traced_weight.shape[0]

    def extra_repr(self) -> str:
        c, kh, kw = self._traced_weight.shape
        return (f"{c}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
                f"activation={self.activation!r}")


class PwcpuDenseConv2d(_WindowLayer):
    """An inference dense ``nn.Conv2d`` (``groups == 1``, a kernel larger than 1x1: a stem, a 3x3
    layer) run by pwcpu's ``conv2d``; see the base class for the paths PyTorch takes."""

    _numpy_layer = DenseConv

    def _weight_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        return shape

    def _torch_groups(self) -> int:
        return 1

    def extra_repr(self) -> str:
        k, c, kh, kw = self._traced_weight.shape
        return (f"{c}, {k}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
                f"activation={self.activation!r}")


class PwcpuInvertedResidual(nn.Module):
    """An [expand ->] depthwise [-> squeeze-excitation] -> project chain of converted layers
    (MobileNetV2's inverted residual block, EfficientNet's MBConv; the input added when
    ``residual``) run as one fused ``pwcpu.InvertedResidual`` call. The layers stay its children
    (their weights are its state, and new weights reach the fused call); under ``torch.compile`` and
    ``torch.export`` they compute one by one, and like them the block computes no gradients.
    ``excitation`` is the squeeze-excitation's (reduce, expand) layers, whose activations are its
    activation and gate; the channel means feeding them are the block's own."""

    def __init__(self, expand: Optional[PwcpuConv2d], depthwise: PwcpuDepthwiseConv2d, project: PwcpuConv2d,
                 residual: bool, excitation: Optional[Tuple[PwcpuConv2d, PwcpuConv2d]] = None) -> None:
        super().__init__()
        self.expand, self.depthwise, self.project = expand, depthwise, project
        self.se_reduce, self.se_expand = excitation if excitation is not None else (None, None)
        self.residual = residual
        self._fused: Optional[InvertedResidual] = None
        self._fused_for: Tuple[int, ...] = ()
        self._fused_at = -1  # _state_changes when _fused was last known current
        self._output_geometry: Dict[torch.Size, tuple] = {}  # input shape -> output (size, stride)

    def _layers(self) -> Tuple[Optional[_ConvolutionLayer], ...]:
        return (self.expand, self.depthwise, self.se_reduce, self.se_expand, self.project)

    def _block(self) -> InvertedResidual:
        if self._fused is not None and self._fused_at == _state_changes[0]:
            return self._fused
        generations = tuple(-1 if m is None else m._generation for m in self._layers())
        if self._fused is None or self._fused_for != generations:
            def arrays(layer):
                return (None, None) if layer is None else \
                    tuple(None if t is None else t.numpy() for t in (layer._traced_weight, layer._traced_bias))
            e, d, r, x, p = self._layers()
            se = {}
            if r is not None:
                (se["se_reduce_weight"], se["se_reduce_bias"]), (se["se_expand_weight"], se["se_expand_bias"]) = \
                    arrays(r), arrays(x)
                se.update(se_activation=r.activation, se_gate=x.activation)
            self._fused = InvertedResidual(*arrays(e), *arrays(d), *arrays(p), stride=d.stride, padding=d.padding,
                                           activation=d.activation, project_activation=p.activation,
                                           residual=self.residual, precision=p.precision, **se)
            self._fused_for = generations
        self._fused_at = _state_changes[0]
        return self._fused

    def _layer_by_layer(self, x: Tensor) -> Tensor:
        h = self.depthwise(x if self.expand is None else self.expand(x))
        if self.se_reduce is not None:
            h = h * self.se_expand(self.se_reduce(h.mean((2, 3), keepdim=True)))
        return self.project(h, x if self.residual else None)

    def forward(self, x: Tensor) -> Tensor:
        if self._fused is not None and self._fused_at == _state_changes[0]:
            out = _fast_lane(self._fused._plan, self._output_geometry, x)
            if out is not None:
                return out
        if not _eager(x) or (x.requires_grad and torch.is_grad_enabled()) or not _plain_operand(x, 4):
            return self._layer_by_layer(x)
        block = self._block()
        geometry = self._output_geometry.get(x.shape)
        if geometry is None:
            dw = self.depthwise
            ho, wo = _output_hw(x, dw.stride, dw.padding, tuple(dw._traced_weight.shape[1:]))
            k = block.out_channels
            geometry = ((x.shape[0], k, ho, wo), (ho * wo * k, 1, wo * k, k))  # channels_last
            if len(self._output_geometry) < 64:
                self._output_geometry[x.shape] = geometry
        out = _new_output(*geometry)
        if not block._plan.conv_channels_last(x.data_ptr(), x.shape, x.stride(), out.data_ptr(), 0, None):
            block(x.detach().permute(0, 2, 3, 1).numpy(), out=out.permute(0, 2, 3, 1).numpy())
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fused"] = None  # built again where it is needed
        return state


class PwcpuChain(nn.Module):
    """A straight run of converted layers in a traced model, each layer's output used by the next
    one only (MobileNet's and EfficientNet's stem and blocks), run as one. Its intermediate outputs
    alternate between two buffers that the chain keeps from call to call, so the run's activations
    stay the same few cache-warm megabytes every call, as ONNX Runtime's and TFLite's planned
    arenas keep theirs, rather than a fresh tensor per layer (only the last layer's output is new,
    and returned). The layers stay where they are in the model and the chain registers none of
    them: ``state_dict`` and ``load_state_dict`` see them under their own names, and new weights
    reach the chain. Calls that cannot take this path (autograd, tracing, ``torch.compile``, a
    concurrent call from another thread while the buffers are in use) run the layers one by one,
    as an unchained model does. A plain NCHW input (channels not contiguous) is copied to NHWC for
    the first layer, as an unchained model's first layer copies it."""

    def __init__(self, layers: Sequence[nn.Module], names: Sequence[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_layers", tuple(layers))  # not children: see the class docstring
        self.layer_names = tuple(names)
        self._forget_runs()

    def _forget_runs(self) -> None:
        # input shape -> (steps, the output's (size, stride), the buffers); a step is a layer's
        # (conv_channels_last, input pointer, shape, strides, output pointer), the first layer's
        # input and the last one's output being the call's.
        self._runs: Dict[torch.Size, tuple] = {}
        self._runs_at = -1  # _state_changes when the runs were made
        self._arena: Tuple[Tensor, ...] = ()
        self._busy = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        for derived in ("_runs", "_runs_at", "_arena", "_busy"):
            state.pop(derived)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._forget_runs()

    def forward(self, x: Tensor) -> Tensor:
        if self._eager_plain(x) and self._busy.acquire(blocking=False):
            try:
                run = self._run_for(x)
                out = None if run is None else self._run_in_buffers(x, run)
            finally:
                self._busy.release()
            if out is not None:
                return out
        return self._one_by_one(x)

    def _eager_plain(self, x) -> bool:
        return _kernel_input(x) and x.dim() == 4 and not torch.compiler.is_compiling()

    def _run_for(self, x: Tensor) -> Optional[tuple]:
        """The buffered run for x's shape, if one was made with the layers' current weights (the
        caller holds the buffers' lock)."""
        if self._runs_at != _state_changes[0]:
            self._runs.clear()  # some layer's weights changed: its plan is a new one
            self._runs_at = _state_changes[0]
        return self._runs.get(x.shape)

    def _run_in_buffers(self, x: Tensor, run: tuple) -> Optional[Tensor]:
        steps, geometry, _ = run
        out = _new_output(*geometry)
        last = len(steps) - 1
        for i, (conv_channels_last, x_data, x_shape, x_strides, out_data) in enumerate(steps):
            if i == 0:
                x_data, x_shape, x_strides = x.data_ptr(), x.shape, x.stride()
            if i == last:
                out_data = out.data_ptr()
            if not conv_channels_last(x_data, x_shape, x_strides, out_data, 0, None):
                return None  # refused (only a residual with strided channels is), computing nothing
        return out

    def _one_by_one(self, x):
        outputs = []
        h = x
        for layer in self._layers:
            h = layer(h)
            outputs.append(h)
        if self._eager_plain(x) and self._busy.acquire(blocking=False):
            try:
                if self._runs_at == _state_changes[0] and x.shape not in self._runs:
                    self._remember_run(x, outputs)
            finally:
                self._busy.release()
        return h

    def _remember_run(self, x: Tensor, outputs: List[Tensor]) -> None:
        """The buffered run for x's shape, from the outputs the layers gave it (the chain's buffers
        replaced, and the runs into the old ones forgotten, when they are too small)."""
        def channels_last(t) -> bool:
            if type(t) is not Tensor or t.dtype is not torch.float32 or t.dim() != 4:
                return False
            _, k, h, w = t.shape
            return t.stride() == (h * w * k, 1, w * k, k) and t.storage_offset() == 0
        if len(self._runs) >= 16 or not all(channels_last(t) for t in outputs):
            return
        needed = max(t.numel() for t in outputs[:-1])
        if not self._arena or self._arena[0].numel() < needed:
            self._runs.clear()
            self._arena = tuple(torch.empty(needed, dtype=torch.float32) for _ in range(2))
        views = [torch.as_strided(self._arena[i % 2], t.shape, t.stride()) for i, t in enumerate(outputs[:-1])]
        steps = []
        for i, layer in enumerate(self._layers):
            plan = layer._block()._plan if isinstance(layer, PwcpuInvertedResidual) else layer._layer._plan
            source = views[i - 1] if i > 0 else None
            steps.append((plan.conv_channels_last, 0 if source is None else source.data_ptr(),
                          None if source is None else source.shape, None if source is None else source.stride(),
                          views[i].data_ptr() if i < len(views) else 0))
        # The run holds its buffers too: a run taken before they were replaced still owns its memory.
        self._runs[x.shape] = (steps, (tuple(outputs[-1].shape), outputs[-1].stride()), self._arena)

    def extra_repr(self) -> str:
        return f"{len(self._layers)} layers: {', '.join(self.layer_names)}"


def _batchnorm_state(bn: nn.BatchNorm2d) -> Tuple[np.ndarray, ...]:
    """(gamma, beta, mean, var) of an inference BatchNorm2d; affine=False means gamma 1, beta 0."""
    k = bn.num_features
    gamma = np.ones(k, np.float32) if bn.weight is None else _as_float32_array(bn.weight)
    beta = np.zeros(k, np.float32) if bn.bias is None else _as_float32_array(bn.bias)
    return gamma, beta, _as_float32_array(bn.running_mean), _as_float32_array(bn.running_var)


class PwcpuBatchNorm2d(_FrozenModule):
    """An inference BatchNorm2d with private state, computed by PyTorch: what a BatchNorm folded
    into a fused pwcpu layer computes when its ``Sequential``'s child is called on its own."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        object.__setattr__(self, "eps", float(bn.eps))
        object.__setattr__(self, "_affine", bn.weight is not None)
        gamma, beta, mean, var = _batchnorm_state(bn)
        self._set_state({"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var})
        # Kept so that the original's state dict loads (unused in inference).
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.clone())

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "num_batches_tracked"] = self.num_batches_tracked.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "num_batches_tracked" in state_dict:
            self.num_batches_tracked = torch.as_tensor(state_dict[prefix + "num_batches_tracked"]).clone()

    def _state_names(self) -> Tuple[str, ...]:
        return ("weight", "bias", "running_mean", "running_var")

    def _set_state(self, values: Dict[str, Optional[np.ndarray]]) -> None:
        k = len(values["running_mean"])
        values = {"weight": np.ones(k, np.float32), "bias": np.zeros(k, np.float32), **values}  # affine=False
        for name in self._state_names():
            self.register_buffer("_" + name, torch.tensor(values[name]), persistent=False)
        self._touch()

    def __getattr__(self, name: str):
        if name in ("weight", "bias") and not self.__dict__.get("_affine", True):
            return None
        if name in ("weight", "bias", "running_mean", "running_var"):
            return nn.Module.__getattr__(self, "_" + name).clone()
        return nn.Module.__getattr__(self, name)

    def state(self) -> Tuple[np.ndarray, ...]:
        return tuple(getattr(self, "_" + name).numpy() for name in self._state_names())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.batch_norm(x, self._running_mean, self._running_var, self._weight, self._bias, False,
                                        0.0, self.eps)


class PwcpuSequential(nn.Sequential):
    """A ``Sequential`` in which runs of (1x1 convolution or linear, BatchNorm, activation) execute
    as one fused pwcpu layer when the Sequential runs as a whole. The children of a fused run
    still compute one by one, exactly as before conversion, for code that calls them directly
    (``seq[0](x)``); the fused layer is derived from them and rebuilt when their state changes."""

    def __init__(self, children: Dict[str, nn.Module], runs: Dict[int, int]) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        object.__setattr__(self, "_runs", runs)  # position of a run's first child -> children it covers
        object.__setattr__(self, "_fused", {})

    def _fused_layer(self, modules: List[nn.Module], start: int) -> nn.Module:
        covered = modules[start:start + self._runs[start]]
        generations = tuple(getattr(m, "_generation", 0) for m in covered)
        cached = self._fused.get(start)
        if cached is not None and cached[0] == generations:
            return cached[1]
        layer, bn, activation = covered[0], None, None
        for module in covered[1:]:
            if isinstance(module, PwcpuBatchNorm2d):
                bn = module
            else:
                activation = _activation_name(module)
        if isinstance(layer, PwcpuConv2d):
            weight, bias = layer.weight.numpy(), None if layer.bias is None else layer.bias.numpy()
            if bn is not None:
                weight, bias = fold_batchnorm(weight, bias, *bn.state(), bn.eps)
            fused: nn.Module = PwcpuConv2d(weight, bias, layer.stride, layer.padding, layer.groups, activation,
                                           layer.precision)
        else:
            fused = PwcpuLinear(layer.weight, layer.bias, activation, layer.precision)
        self._fused[start] = (generations, fused)
        return fused

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_fused"] = {}  # derived: rebuilt on first use
        return state

    def forward(self, x):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            if i in self._runs:
                x = self._fused_layer(modules, i)(x)
                i += self._runs[i]
            else:
                x = modules[i](x)
                i += 1
        return x


# ---- convert -------------------------------------------------------------------------------


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _ineligible_reason(module: nn.Module) -> Optional[str]:
    """Why a 1x1 convolution or a linear layer cannot run on pwcpu, or None."""
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward:
            return f"{type(module).__name__} has its own forward"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}"
        if tuple(module.dilation) != (1, 1):
            return f"dilation={tuple(module.dilation)}"
    elif type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has its own forward"
    if _has_hooks(module):
        return "it has hooks"
    if module.weight.dtype != torch.float32:
        return f"dtype {module.weight.dtype}"
    if module.weight.device.type != "cpu":
        return f"device {module.weight.device}"
    return None


def _is_pointwise(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return tuple(module.kernel_size) == (1, 1)
    return isinstance(module, nn.Linear)


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels
            and tuple(module.kernel_size) != (1, 1))


# Dense convolutions pwcpu takes: stems (few input channels, where im2col rows are short and the
# activation is fused) and deep layers. At 56x56 with 64 channels, oneDNN's direct convolution
# measured faster than the GEMM over im2col rows (0.82-0.95x on Zen 3), at 28x28 with 128 as fast,
# and from 256 channels pwcpu is 1.2-2.7x faster (1 and 2 threads).
_DENSE_STEM_MAX_CHANNELS, _DENSE_MIN_CHANNELS = 4, 128


def _is_dense(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.kernel_size) != (1, 1)
            and (module.in_channels <= _DENSE_STEM_MAX_CHANNELS or module.in_channels >= _DENSE_MIN_CHANNELS))


def _foldable_batchnorm(module: nn.Module) -> bool:
    return (type(module) is nn.BatchNorm2d and module.track_running_stats and module.running_mean is not None
            and not _has_hooks(module))


_FUNCTION_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu",
                         F.hardswish: "hardswish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.gelu: "gelu",
                         F.hardsigmoid: "hardsigmoid"}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_ADDS = (operator.add, operator.iadd, torch.add)


def _node_activation(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The activation a graph node applies to its one tensor argument, if pwcpu has it."""
    if node.op == "call_module":
        module = modules[node.target]
        return None if _has_hooks(module) or len(node.args) != 1 or node.kwargs else _activation_name(module)
    if len(node.args) != 1 or set(node.kwargs) - {"inplace", "approximate"}:
        return None
    if node.op == "call_function" and node.target in _FUNCTION_ACTIVATIONS:
        if node.target is F.gelu and node.kwargs.get("approximate", "none") != "none":
            return None
        return _FUNCTION_ACTIVATIONS[node.target]
    if node.op == "call_method" and not node.kwargs:
        return _METHOD_ACTIVATIONS.get(node.target)
    return None


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _convert_graph(model: nn.Module, report: List[str], skipped: List[str], precision: str) -> Optional[nn.Module]:
    """``model`` traced by torch.fx and rewritten, or None where it cannot be traced.

    The graph says exactly what feeds what, whatever the modules' own ``forward`` methods do, so
    every fusion is proven by it: a BatchNorm2d whose only input is a convolution's only use is
    folded into that convolution (3x3 and depthwise ones too, which stay PyTorch's); a 1x1
    convolution or linear layer followed by an addition of another tensor (a residual) and/or an
    activation, each the previous node's only use, becomes one pwcpu layer.
    """
    if _has_hooks(model):
        return None  # a traced copy would not call the root's hooks
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any untraceable model takes the module-by-module path
        return None
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    _drop_inference_identities(graph, report)
    _shuffle_channels_in_nhwc(graph, report)

    def single_use_module(node: fx.Node) -> Optional[nn.Module]:
        if node.op != "call_module" or calls[node.target] != 1:
            return None
        return modules[node.target]

    for node in list(graph.nodes):
        bn = single_use_module(node)
        if bn is None or not _foldable_batchnorm(bn) or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        conv = single_use_module(source) if isinstance(source, fx.Node) else None
        if conv is None or type(conv) is not nn.Conv2d or _has_hooks(conv) or len(source.users) != 1 \
                or conv.weight.dtype != torch.float32:
            continue
        _set_submodule(graph_module, source.target, fuse_conv_bn_eval(conv, bn))
        modules[source.target] = graph_module.get_submodule(source.target)
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        report.append(f"{node.target}: folded into {source.target}")

    for node in list(graph.nodes):
        layer = single_use_module(node)
        if layer is None or not (_is_pointwise(layer) or _is_depthwise(layer) or _is_dense(layer)):
            continue
        reason = _ineligible_reason(layer)
        if reason is not None:
            skipped.append(f"{node.target}: left to PyTorch ({reason})")
            continue
        chain, residual = [node], None
        user = _sole_user(node)
        if not _is_depthwise(layer) and user is not None and user.op == "call_function" and user.target in _ADDS \
                and len(user.args) == 2 \
                and not user.kwargs and all(isinstance(a, fx.Node) for a in user.args):
            residual = user.args[1] if user.args[0] is node else user.args[0]
            chain.append(user)
            user = _sole_user(user)
        activation = _node_activation(user, modules) if user is not None else None
        if activation is not None:
            chain.append(user)
        if _is_depthwise(layer):
            converted = PwcpuDepthwiseConv2d.from_module(layer, activation)
        elif _is_dense(layer):
            converted = PwcpuDenseConv2d.from_module(layer, activation)
        elif isinstance(layer, nn.Conv2d):
            converted = PwcpuConv2d.from_modules(layer, None, activation, precision)
        else:
            converted = PwcpuLinear.from_module(layer, activation, precision)
        _set_submodule(graph_module, node.target, converted)
        with graph.inserting_after(chain[-1]):
            fused = graph.call_module(node.target, (node.args[0],) + ((residual,) if residual is not None else ()))
        chain[-1].replace_all_uses_with(fused)
        for erased in reversed(chain):
            graph.erase_node(erased)
        parts = (["residual add"] if residual is not None else []) + ([activation] if activation else [])
        report.append(f"{node.target}: pwcpu" + (f" (fused {', '.join(parts)})" if parts else ""))
    _fuse_inverted_residuals(graph_module, report)
    _pool_pixels_on_pwcpu(graph_module, report)
    graph.lint()
    graph_module.delete_all_unused_submodules()
    _chain_straight_runs(graph_module, report)  # after the deletion: the chained layers stay registered
    graph.lint()
    graph_module.recompile()
    return graph_module


def _fuse_inverted_residuals(graph_module: fx.GraphModule, report: List[str]) -> None:
    """Chains of converted layers, each the previous one's only use: [expand (1x1) ->] depthwise
    [-> squeeze-excitation] -> project (1x1, + the chain's input), with at least an expansion or a
    squeeze-excitation and one activation for expand and depthwise, become one
    PwcpuInvertedResidual. A squeeze-excitation is the depthwise output's two uses: global average
    pooling -> 1x1 (reduce) -> 1x1 (expand), whose result multiplies the depthwise output."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())

    def layer(node, kind: type) -> Optional[nn.Module]:
        if not isinstance(node, fx.Node) or node.op != "call_module" or node.kwargs:
            return None
        module = modules.get(node.target)
        return module if type(module) is kind else None

    def plain_1x1(node, inputs) -> Optional[PwcpuConv2d]:
        conv = layer(node, PwcpuConv2d)
        ok = conv is not None and conv.groups == 1 and conv.stride == (1, 1) and conv.padding == (0, 0)
        return conv if ok and tuple(node.args[:len(inputs)]) == inputs else None

    def excitation(dw_node: fx.Node):
        """(reduce node, expand node, multiply node) of the squeeze-excitation on dw_node, or None."""
        users = list(dw_node.users)
        pools = [u for u in users if u.op == "call_module" and isinstance(modules.get(u.target), nn.AdaptiveAvgPool2d)
                 and _pair(modules[u.target].output_size) == (1, 1) and u.args == (dw_node,) and not u.kwargs]
        if len(users) != 2 or len(pools) != 1:
            return None
        reduce_node = _sole_user(pools[0])
        expand_node = _sole_user(reduce_node) if plain_1x1(reduce_node, (pools[0],)) is not None \
            and len(reduce_node.args) == 1 else None
        if expand_node is None or plain_1x1(expand_node, (reduce_node,)) is None or len(expand_node.args) != 1:
            return None
        multiply = _sole_user(expand_node)
        if multiply is None or multiply not in users or multiply.op != "call_function" \
                or multiply.target not in (operator.mul, torch.mul) or multiply.kwargs \
                or set(multiply.args) != {dw_node, expand_node} or len(multiply.args) != 2:
            return None
        return pools[0], reduce_node, expand_node, multiply

    for dw_node in list(graph.nodes):
        depthwise = layer(dw_node, PwcpuDepthwiseConv2d)
        if depthwise is None or len(dw_node.args) != 1:
            continue
        node = dw_node.args[0]
        expand = plain_1x1(node, tuple(node.args[:1])) if isinstance(node, fx.Node) else None
        if expand is None or len(node.args) != 1 or _sole_user(node) is not dw_node \
                or expand.activation != depthwise.activation:
            expand, node = None, dw_node
        se = excitation(dw_node)
        last = dw_node if se is None else se[-1]
        project_node = _sole_user(last)
        project = plain_1x1(project_node, (last,))
        if project is None or (expand is None and se is None):
            continue
        x = node.args[0]
        residual = len(project_node.args) == 2
        if residual and project_node.args[1] is not x:
            continue
        kh, kw = depthwise._traced_weight.shape[1:]
        in_channels = depthwise._traced_weight.shape[0] if expand is None else expand._traced_weight.shape[1]
        same = depthwise.stride == (1, 1) and depthwise.padding == ((kh - 1) // 2, (kw - 1) // 2) and kh % 2 == 1 \
            and kw % 2 == 1 and project._traced_weight.shape[0] == in_channels
        if residual and not same:
            continue
        excitation_layers = None if se is None else (modules[se[1].target], modules[se[2].target])
        precisions = {m.precision for m in (expand, project) + (excitation_layers or ()) if m is not None}
        if len(precisions) != 1:
            continue  # the fused block computes all its 1x1 stages at one precision
        fused = PwcpuInvertedResidual(expand, depthwise, project, residual, excitation_layers)
        graph_module.add_submodule(node.target + "_block", fused)
        with graph.inserting_after(project_node):
            call = graph.call_module(node.target + "_block", (x,))
        project_node.replace_all_uses_with(call)
        chain = [node] + ([dw_node] if expand is not None else []) + (list(se) if se is not None else []) + [project_node]
        for erased in reversed(chain):
            graph.erase_node(erased)
        parts = (["squeeze-excitation"] if se is not None else []) + (["+ input"] if residual else [])
        report.append(", ".join(n.target for n in chain if n.op == "call_module"
                                and not isinstance(modules.get(n.target), nn.AdaptiveAvgPool2d))
                      + ": one fused pwcpu InvertedResidual" + (f" ({', '.join(parts)})" if parts else ""))


def _chain_straight_runs(graph_module: fx.GraphModule, report: List[str]) -> None:
    """Straight runs of two or more converted layers (each call's only input the previous call,
    which has no other use) become one PwcpuChain call; the layers stay registered where they are."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    chainable = (PwcpuConv2d, PwcpuDepthwiseConv2d, PwcpuDenseConv2d, PwcpuInvertedResidual)

    def layer_call(node) -> bool:
        return node.op == "call_module" and not node.kwargs and len(node.args) == 1 \
            and type(modules.get(node.target)) in chainable

    runs: List[List[fx.Node]] = []
    for node in graph.nodes:
        if not layer_call(node):
            continue
        previous = runs[-1][-1] if runs else None
        if previous is not None and node.args[0] is previous and len(previous.users) == 1:
            runs[-1].append(node)
        else:
            runs.append([node])
    for run in (run for run in runs if len(run) > 1):
        name = next(f"pwcpu_chain_{i}" for i in itertools.count() if not hasattr(graph_module, f"pwcpu_chain_{i}"))
        targets = [node.target for node in run]
        graph_module.add_module(name, PwcpuChain([modules[t] for t in targets], targets))
        with graph.inserting_after(run[-1]):
            call = graph.call_module(name, (run[0].args[0],))
        run[-1].replace_all_uses_with(call)
        for node in reversed(run):
            graph.erase_node(node)
        report.append(f"{targets[0]} .. {targets[-1]}: one {name} of {len(run)} layers (intermediate outputs "
                      "in two buffers it keeps)")


def _graph_leaf(function):
    """``function`` recorded as one call where torch.fx traces code that calls it, as
    ``torch.fx.wrap`` records a module's own calls: also when a saved converted model is loaded,
    which traces its code again, and when a converted model is traced."""
    @functools.wraps(function)
    def leaf(*args, **kwargs):
        first = args[0][0] if isinstance(args[0], (tuple, list)) and args[0] else args[0]
        if isinstance(first, fx.Proxy):
            return first.tracer.create_proxy("call_function", leaf, args, kwargs)
        return function(*args, **kwargs)
    return leaf


@_graph_leaf
def channel_shuffle(parts: Sequence[Tensor], groups: int) -> Tensor:
    """ShuffleNet's ``channel_shuffle(torch.cat(parts, 1), groups)`` (channel ``g * (C / groups) + i``
    moves to ``i * groups + g``), computed on NHWC memory in one pass: the result is channels_last,
    and its channel halves (ShuffleNet's ``chunk``) are NHWC views that pwcpu's layers read in
    place. The NCHW original makes a plain NCHW tensor (and a channels_last model copies every
    activation twice more). Where the parts are ``groups`` tensors of one shape, the result just
    interleaves their channels, and the concatenation is never made."""
    if len(parts) == groups and all(p.shape == parts[0].shape for p in parts[1:]):
        n, per_group, h, w = parts[0].shape
        if all(_kernel_input(p) for p in parts) and not torch.compiler.is_compiling():
            out = _new_output((n, h, w, per_group * groups)).permute(0, 3, 1, 2)
            _core.interleave_channels(out.data_ptr(), [(p.data_ptr(), p.shape, p.stride()) for p in parts])
            return out
        nhwc = torch.stack([p.permute(0, 2, 3, 1) for p in parts], dim=4)  # (n, h, w, per_group, groups)
    else:
        x = torch.cat(tuple(parts), 1) if len(parts) > 1 else parts[0]
        n, c, h, w = x.shape
        if c % groups:
            raise ValueError(f"channel_shuffle: {c} channels do not split into {groups} groups")
        per_group = c // groups
        nhwc = x.permute(0, 2, 3, 1).unflatten(3, (groups, per_group)).transpose(3, 4).contiguous()
    return nhwc.view(n, h, w, per_group * groups).permute(0, 3, 1, 2)


def _pixel_axes(dim) -> bool:
    """Whether ``dim`` names axes 2 and 3 of a 4-D tensor (an out-of-range axis is not taken)."""
    return isinstance(dim, (list, tuple)) and len(dim) == 2 and all(type(d) is int and -4 <= d < 4 for d in dim) \
        and sorted(d % 4 for d in dim) == [2, 3]


def _pixel_means(x, keepdim: bool) -> Optional[Tensor]:
    """The means of a 4-D tensor over H and W by pwcpu's kernel, for a float32 CPU tensor with
    contiguous channels (channels_last) outside autograd and tracing; else None."""
    if not _kernel_input(x) or x.dim() != 4 or (x.stride(1) != 1 and x.shape[1] > 1) or torch.compiler.is_compiling():
        return None
    n, c = x.shape[:2]
    out = torch.empty((n, c, 1, 1) if keepdim else (n, c))
    _core.channel_means(out.data_ptr(), x.data_ptr(), x.shape, x.stride())
    return out


@_graph_leaf
def adaptive_avg_pool_to_one(x: Tensor) -> Tensor:
    """``F.adaptive_avg_pool2d(x, 1)`` (global average pooling): for a float32 channels_last
    tensor, pwcpu's one pass over its NHWC memory, where PyTorch's reduction took 70-150 us on a
    7x7 map of 960-1280 channels (about 2 % of a converted MobileNet); PyTorch's otherwise."""
    out = _pixel_means(x, True)
    return F.adaptive_avg_pool2d(x, 1) if out is None else out


@_graph_leaf
def mean_over_pixels(x: Tensor, dim: Tuple[int, ...], keepdim: bool = False) -> Tensor:
    """``x.mean(dim, keepdim=keepdim)``, by pwcpu's kernel where ``dim`` names axes 2 and 3 of a
    4-D tensor (as :func:`adaptive_avg_pool_to_one`)."""
    out = _pixel_means(x, keepdim) if x.dim() == 4 and _pixel_axes(dim) else None
    return x.mean(dim, keepdim=keepdim) if out is None else out


def _pool_pixels_on_pwcpu(graph_module: fx.GraphModule, report: List[str]) -> None:
    """Global average pooling left in the graph (``nn.AdaptiveAvgPool2d(1)``, its functional form,
    ``x.mean((2, 3))`` and ``torch.mean``), after the fused blocks took their own, becomes a call
    of :func:`adaptive_avg_pool_to_one` or :func:`mean_over_pixels`."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())

    for node in list(graph.nodes):
        replacement = None
        if node.op == "call_module" and type(modules.get(node.target)) is nn.AdaptiveAvgPool2d \
                and not _has_hooks(modules[node.target]) and _pair(modules[node.target].output_size) == (1, 1) \
                and len(node.args) == 1 and not node.kwargs:
            replacement = (adaptive_avg_pool_to_one, node.args)
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d and len(node.args) == 2 \
                and not node.kwargs and node.args[1] in (1, (1, 1), [1, 1]):
            replacement = (adaptive_avg_pool_to_one, node.args[:1])
        elif (node.op == "call_method" and node.target == "mean") \
                or (node.op == "call_function" and node.target is torch.mean):
            arguments = dict(zip(("x", "dim", "keepdim"), node.args), **node.kwargs)
            dims, keepdim = arguments.get("dim"), arguments.get("keepdim", False)
            if set(arguments) <= {"x", "dim", "keepdim"} and _pixel_axes(dims) and type(keepdim) is bool:
                replacement = (mean_over_pixels, (arguments["x"], tuple(dims), keepdim))
        if replacement is None or not isinstance(replacement[1][0], fx.Node):
            continue
        with graph.inserting_after(node):
            call = graph.call_function(*replacement)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        report.append(f"{node.name}: global average pooling on pwcpu (one pass over NHWC memory)")


def _shuffle_channels_in_nhwc(graph: fx.Graph, report: List[str]) -> None:
    """Each traced channel shuffle (torchvision's ``channel_shuffle``: ``n, c, h, w = x.size()``,
    ``x.view(n, g, c // g, h, w)``, ``transpose(1, 2)``, ``contiguous()``, ``view(n, c, h, w)``),
    with the ``torch.cat(..., 1)`` that makes x when x has no other use, becomes one call of
    :func:`channel_shuffle`. Every node of the pattern is proven from the graph."""
    def only(node, op: str, targets: tuple) -> bool:
        return isinstance(node, fx.Node) and node.op == op and node.target in targets and not node.kwargs

    def size_item(node, size: fx.Node, index: int) -> bool:
        return only(node, "call_function", (operator.getitem,)) and node.args == (size, index)

    for last in list(graph.nodes):
        if not only(last, "call_method", ("view",)) or len(last.args) != 5:
            continue
        contiguous = last.args[0]
        if not only(contiguous, "call_method", ("contiguous",)) or len(contiguous.args) != 1 \
                or len(contiguous.users) != 1:
            continue
        transpose = contiguous.args[0]
        transposes = only(transpose, "call_function", (torch.transpose,)) or only(transpose, "call_method", ("transpose",))
        if not transposes or tuple(transpose.args[1:]) not in ((1, 2), (2, 1)) or len(transpose.users) != 1:
            continue
        split = transpose.args[0]
        if not only(split, "call_method", ("view",)) or len(split.args) != 6 or len(split.users) != 1:
            continue
        x, n, groups, per_group, h, w = split.args
        size = n.args[0] if only(n, "call_function", (operator.getitem,)) else None
        if not isinstance(groups, int) or groups < 1 or not only(size, "call_method", ("size",)) \
                or size.args != (x,) or not all(size_item(*a) for a in ((n, size, 0), (h, size, 2), (w, size, 3))):
            continue
        c = last.args[2]
        if not size_item(c, size, 1) or last.args[1:] != (n, c, h, w) \
                or not (only(per_group, "call_function", (operator.floordiv,)) and per_group.args == (c, groups)):
            continue
        parts = (x,)
        concatenated = isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.cat \
            and set(x.kwargs) <= {"dim"} and len(x.args) + len(x.kwargs) == 2
        if concatenated and (x.kwargs["dim"] if x.kwargs else x.args[1]) == 1 and set(x.users) == {size, split}:
            parts = tuple(x.args[0])
        with graph.inserting_after(last):
            call = graph.call_function(channel_shuffle, (parts, groups))
        last.replace_all_uses_with(call)
        for node in (last, contiguous, transpose, split, per_group, c, n, h, w, size) + ((x,) if parts != (x,) else ()):
            if not node.users:
                graph.erase_node(node)
        report.append(f"{last.name}: channel shuffle ({groups} groups"
                      + (", with the concatenation before it" if parts != (x,) else "") + ") in NHWC, one pass")


def _drop_inference_identities(graph: fx.Graph, report: List[str]) -> None:
    """torchvision's stochastic depth in inference (``training=False``) returns its input: removed,
    so that the residual addition after it reaches the convolution before it."""
    for node in list(graph.nodes):
        target = node.target
        if node.op != "call_function" or getattr(target, "__name__", "") != "stochastic_depth" \
                or not getattr(target, "__module__", "").startswith("torchvision."):
            continue
        training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
        if training is False and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            report.append(f"{node.name}: stochastic depth in inference (the identity) removed")


def convert(model: nn.Module, *, channels_last: bool = True, trace: bool = True, precision: str = "fp32") -> nn.Module:
    """An inference (eval) copy of ``model`` whose 1x1 convolutions and linear layers run on pwcpu.

    With ``trace`` (the default) the copy is traced with ``torch.fx`` where it can be: then every
    BatchNorm2d that follows a convolution is folded into it, and each eligible 1x1 ``nn.Conv2d``
    (a ``PwcpuConv2d``) or ``nn.Linear`` (a ``PwcpuLinear``) absorbs a residual addition and an
    activation (ReLU, ReLU6, SiLU, Hardswish, Sigmoid, Hardsigmoid, exact GELU; modules or functions) that
    follow it in the graph; each depthwise ``nn.Conv2d`` (``groups == in_channels ==
    out_channels``, zero padding, no dilation) becomes a ``PwcpuDepthwiseConv2d`` with its
    following activation fused, and each dense one (``groups == 1``) with at most 4 input channels
    (a stem) or at least 128 (where pwcpu's GEMM over im2col rows measured faster than PyTorch's
    direct convolution) a ``PwcpuDenseConv2d``, absorbing a residual addition and an activation. The result is a ``torch.fx.GraphModule``: it computes what the model's
    ``forward`` did, but has none of its other methods and attributes. A model that cannot be
    traced, or any model with ``trace=False`` (which keeps the model's class), is converted module
    by module: a 1x1 convolution directly followed by ``BatchNorm2d`` and/or an activation in a
    plain ``nn.Sequential`` runs as one fused layer when the Sequential runs as a whole (it becomes
    a ``PwcpuSequential`` whose children still compute one by one). Either way, layers with hooks,
    subclasses with their own ``forward`` and layers pwcpu cannot take are left to PyTorch. With
    ``channels_last`` (the default) the copy's other 4-D weights are moved to channels_last
    memory, the format pwcpu's layers read in place and produce. The copy's ``pwcpu_report``
    lists what was converted and folded, and what was not (and why); layers left to PyTorch also
    raise a ``PwcpuConversionWarning``. ``precision="bf16"`` makes the 1x1 convolutions and linear
    layers compute as ``pwcpu.conv1x1(..., precision="bf16")`` does (weights and inputs rounded to
    bfloat16, float32 sums; the model still takes and returns float32 tensors, and they also take
    bfloat16 ones); fused inverted residual blocks compute their 1x1 stages in bf16 and the depthwise
    one in float32. ``precision="int8"`` does the same with dynamic int8 quantization. In a traced
    copy, each straight run of converted layers (each the previous one's only use) runs as one
    ``PwcpuChain`` (see its docstring), and each channel shuffle written as torchvision's
    ShuffleNetV2 writes it becomes a call of :func:`channel_shuffle`, which keeps the activations
    channels_last, and global average pooling one of :func:`adaptive_avg_pool_to_one` or
    :func:`mean_over_pixels`.
    """
    _precision_code(precision)
    converted = copy.deepcopy(model).eval()
    report: List[str] = []
    skipped: List[str] = []
    traced = _convert_graph(converted, report, skipped, precision) if trace else None
    if traced is not None:
        return _finish_conversion(traced, report, skipped, channels_last)

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        names = list(module._modules)
        runs: Dict[int, int] = {}
        i = 0
        while i < len(names):
            name = names[i]
            child = module._modules[name]
            path = f"{prefix}{name}"
            if child is None or not _is_pointwise(child):
                if child is not None:
                    module._modules[name] = visit(child, path + ".")
                i += 1
                continue
            reason = _ineligible_reason(child)
            if reason is not None:
                skipped.append(f"{path}: left to PyTorch ({reason})")
                i += 1
                continue
            module._modules[name] = PwcpuConv2d.from_modules(child, precision=precision) \
                if isinstance(child, nn.Conv2d) else PwcpuLinear.from_module(child, precision=precision)
            covered = 1
            if type(module) is nn.Sequential:  # a subclass may have its own forward
                following = [module._modules[n] for n in names[i + 1:i + 3]]
                if isinstance(child, nn.Conv2d) and following and _foldable_batchnorm(following[0]):
                    module._modules[names[i + 1]] = PwcpuBatchNorm2d(following.pop(0))
                    covered += 1
                if following and following[0] is not None and _activation_name(following[0]) is not None \
                        and not _has_hooks(following[0]):
                    covered += 1
            if covered > 1:
                runs[i] = covered
                report.append(f"{path}: pwcpu (fused {', '.join(names[i + 1:i + covered])})")
            else:
                report.append(f"{path}: pwcpu")
            i += covered
        return PwcpuSequential(dict(module._modules), runs) if runs else module

    return _finish_conversion(visit(converted, ""), report, skipped, channels_last)


def _finish_conversion(converted: nn.Module, report: List[str], skipped: List[str], channels_last: bool) -> nn.Module:
    if channels_last:
        converted = converted.to(memory_format=torch.channels_last)
    converted.pwcpu_report = report + skipped
    if skipped:
        warnings.warn("pwcpu.torch.convert left layers to PyTorch: " + "; ".join(skipped),
                      PwcpuConversionWarning, stacklevel=3)
    return converted
