"""MobileNetV2 and ResNet-50 in plain PyTorch (no torchvision), for tests and benchmarks of the
PyTorch bridge. Random weights; ``randomize_batchnorm`` gives BatchNorm non-trivial statistics."""

from __future__ import annotations

import sys
from typing import List, Optional

import torch
from torch import nn

__all__ = ["Bottleneck", "InvertedResidual", "mobilenet_v2", "randomize_batchnorm", "resnet50", "torchvision_models"]


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, act=nn.ReLU6) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> 3x3 depthwise -> 1x1 project, plus the identity."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: List[nn.Module] = [conv_bn(c_in, hidden)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, hidden), conv_bn(hidden, c_out, act=None)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce -> 3x3 -> 1x1 expand, plus the (downsampled) identity."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.downsample = None
        if stride != 1 or c_in != 4 * width:
            self.downsample = conv_bn(c_in, 4 * width, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn3(self.conv3(y)) + identity)


def mobilenet_v2(width: int = 32) -> nn.Sequential:
    """MobileNetV2's feature extractor (224x224 input: 17 blocks, 35 pointwise layers)."""
    layers: List[nn.Module] = [conv_bn(3, width, 3, 2)]
    c = width
    for expand, c_out, repeats, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(repeats):
            layers.append(InvertedResidual(c, c_out, stride if i == 0 else 1, expand))
            c = c_out
    layers.append(conv_bn(c, 1280))
    return nn.Sequential(*layers)


def resnet50() -> nn.Sequential:
    """ResNet-50's feature extractor (stem and the four stages of bottlenecks)."""
    layers: List[nn.Module] = [conv_bn(3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)]
    c = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers.append(Bottleneck(c, width, stride if i == 0 else 1))
            c = 4 * width
    return nn.Sequential(*layers)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
                m.running_mean.normal_(0.0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def torchvision_models() -> Optional[object]:
    """``torchvision.models`` when torchvision is installed, else None.

    Only the model definitions are needed, and they are plain Python. A torchvision wheel whose
    compiled operators do not load with the installed torch (its ``import`` fails registering
    ``torchvision::nms``) is imported after declaring the schemas of the two operators its import
    registers fake kernels for; calling them still fails, and no classification model calls them.
    """
    try:
        import torchvision.models
    except ImportError:
        return None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        global _torchvision_schemas
        _torchvision_schemas = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not hasattr(torch.ops.torchvision, op):
                _torchvision_schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        try:
            import torchvision.models
        except ImportError:  # past the operators, a dependency installed without it (Pillow)
            return None
    return torchvision.models


_torchvision_schemas = None  # the Library object must outlive the import for its definitions to stay
