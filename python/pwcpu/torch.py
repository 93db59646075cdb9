"""PyTorch bridge (optional: ``import pwcpu`` never needs torch).

- ``torch.ops.pwcpu.conv1x1``: a custom operator with a fake (meta) implementation, so models that
  call it survive ``torch.compile`` and ``torch.export``. Inputs use PyTorch's NCHW shapes; a
  channels_last tensor reaches the kernels without a copy, and the result is channels_last.
- ``PwcpuConv2d``: an ``nn.Module`` running a 1x1 convolution (with a folded BatchNorm and an
  activation) through that operator.
- ``convert(model)``: an inference copy of a model in which every eligible 1x1 ``nn.Conv2d`` (and
  a BatchNorm2d and ReLU/ReLU6/SiLU/Hardswish/GELU/Sigmoid directly following it in a
  ``Sequential``) is replaced by a ``PwcpuConv2d``.
"""

from __future__ import annotations

import collections
import copy
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._api import PointwiseConv
from ._block import fold_batchnorm

__all__ = ["PwcpuConv2d", "PwcpuConversionWarning", "conv1x1", "convert"]

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                       nn.Sigmoid: "sigmoid"}


def _activation_name(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    return _ACTIVATION_MODULES.get(type(module))


class PwcpuConversionWarning(UserWarning):
    """A 1x1 convolution that ``convert`` had to leave to PyTorch."""


# Packed layers by weight tensor: packing costs a pass over the weights, so a model's parameters
# are packed once. The cache holds the tensors it keys on, so their addresses cannot be reused.
_PACKED_CACHE_SIZE = 256
_packed: "collections.OrderedDict[tuple, Tuple[PointwiseConv, Tensor, Optional[Tensor]]]" = collections.OrderedDict()


def _packed_layer(weight: Tensor, bias: Optional[Tensor], stride, padding, groups: int, activation: Optional[str]):
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()),
           None if bias is None else (bias.data_ptr(), bias._version), tuple(stride), tuple(padding), groups,
           activation)
    entry = _packed.get(key)
    if entry is None:
        w = weight.detach().reshape(weight.shape[0], weight.shape[1]).numpy()
        b = None if bias is None else bias.detach().numpy()
        layer = PointwiseConv(w, b, stride=tuple(stride), padding=tuple(padding), groups=groups,
                              activation=activation)
        entry = (layer, weight, bias)
        _packed[key] = entry
        if len(_packed) > _PACKED_CACHE_SIZE:
            _packed.popitem(last=False)
    else:
        _packed.move_to_end(key)
    return entry[0]


def _output_hw(x: Tensor, stride: List[int], padding: List[int]) -> Tuple[int, int]:
    h, w = x.shape[2], x.shape[3]
    return (h + 2 * padding[0] - 1) // stride[0] + 1, (w + 2 * padding[1] - 1) // stride[1] + 1


@torch.library.custom_op("pwcpu::conv1x1", mutates_args=())
def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int], groups: int,
            activation: Optional[str], residual: Optional[Tensor]) -> Tensor:
    """1x1 convolution of an NCHW-shaped float32 CPU tensor: ``act(conv(x) + bias + residual)``."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError("pwcpu::conv1x1 takes float32 CPU tensors")
    layer = _packed_layer(weight, bias, stride, padding, groups, activation)
    ho, wo = _output_hw(x, stride, padding)
    out = torch.empty((x.shape[0], ho, wo, weight.shape[0]), dtype=torch.float32)
    nhwc = x.detach().permute(0, 2, 3, 1).numpy()  # a view: contiguous channels for channels_last x
    res = None if residual is None else residual.detach().permute(0, 2, 3, 1).numpy()
    layer(nhwc, residual=res, out=out.numpy())
    return out.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory


@conv1x1.register_fake
def _(x, weight, bias, stride, padding, groups, activation, residual):
    ho, wo = _output_hw(x, stride, padding)
    return x.new_empty((x.shape[0], ho, wo, weight.shape[0])).permute(0, 3, 1, 2)


class PwcpuConv2d(nn.Module):
    """An inference 1x1 convolution (BatchNorm folded in, activation fused) run by pwcpu."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], stride, padding, groups: int,
                 activation: Optional[str] = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())
        self.stride, self.padding = list(stride), list(padding)
        self.groups, self.activation = groups, activation

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None,
                     activation: Optional[str] = None) -> "PwcpuConv2d":
        weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        if bn is not None:
            w, b = fold_batchnorm(weight.numpy(), None if bias is None else bias.numpy(), bn.weight.detach().numpy(),
                                  bn.bias.detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy(), bn.eps)
            weight, bias = torch.from_numpy(w), torch.from_numpy(b)
        return cls(weight, bias, _pair(conv.stride), _pair(conv.padding), conv.groups, activation)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return torch.ops.pwcpu.conv1x1(x, self.weight, self.bias, self.stride, self.padding, self.groups,
                                       self.activation, residual)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}, groups={self.groups}, activation={self.activation!r}")


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _ineligible_reason(conv: nn.Conv2d) -> Optional[str]:
    """Why a 1x1 convolution cannot run on pwcpu, or None."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if conv.weight.dtype != torch.float32:
        return f"dtype {conv.weight.dtype}"
    if conv.weight.device.type != "cpu":
        return f"device {conv.weight.device}"
    return None


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def convert(model: nn.Module) -> nn.Module:
    """An inference (eval) copy of ``model`` with its 1x1 convolutions running on pwcpu.

    In a ``Sequential``, a 1x1 ``Conv2d`` directly followed by ``BatchNorm2d`` and/or an activation
    (ReLU, ReLU6, SiLU, Hardswish, Sigmoid, exact GELU) becomes one fused ``PwcpuConv2d`` (the folded modules
    become ``Identity``); elsewhere a 1x1 ``Conv2d`` alone is replaced. Everything else is left as
    it is. The copy's ``pwcpu_report`` lists what was replaced and what was not (and why);
    1x1 convolutions that could not be converted also raise a ``PwcpuConversionWarning``.
    """
    converted = copy.deepcopy(model).eval()
    report: List[str] = []
    skipped: List[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        names = list(module._modules)
        consumed = set()
        for i, name in enumerate(names):
            child = module._modules[name]
            if child is None or name in consumed:
                continue
            path = f"{prefix}{name}"
            if not _is_pointwise(child):
                visit(child, path + ".")
                continue
            reason = _ineligible_reason(child)
            if reason is not None:
                skipped.append(f"{path}: left to PyTorch ({reason})")
                continue
            bn, activation, fused = None, None, []
            if isinstance(module, nn.Sequential):
                following = [module._modules[n] for n in names[i + 1:i + 3]]
                if following and isinstance(following[0], nn.BatchNorm2d) and following[0].track_running_stats:
                    bn = following.pop(0)
                    fused.append(names[i + 1])
                if following and _activation_name(following[0]) is not None:
                    activation = _activation_name(following[0])
                    fused.append(names[i + 1 + len(fused)])
            module._modules[name] = PwcpuConv2d.from_modules(child, bn, activation)
            for folded in fused:
                module._modules[folded] = nn.Identity()
                consumed.add(folded)
            report.append(f"{path}: pwcpu" + (f" (fused {', '.join(fused)})" if fused else ""))

    visit(converted, "")
    converted.pwcpu_report = report + skipped
    if skipped:
        warnings.warn("pwcpu.torch.convert left 1x1 convolutions to PyTorch: " + "; ".join(skipped),
                      PwcpuConversionWarning, stacklevel=2)
    return converted
