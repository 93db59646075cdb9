"""Inference blocks built from trained weights: BatchNorm folding and the conv-BN-activation block."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numbers

import numpy as np

from ._api import IntPair, PointwiseConv, _activation_code, _int, _layout_code, _pair, _precision_code

__all__ = ["PointwiseConvBlock", "fold_batchnorm"]


def _vector(name: str, value, length: int) -> np.ndarray:
    v = np.asarray(value)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got {v.dtype}")
    if v.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {v.shape}")
    return v.astype(np.float64)


def _eps(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"eps must be >= 0, got {value!r}")
    return float(value)


def _float32_parameter(name: str, value) -> np.ndarray:
    """A parameter as float32: real numeric data, rounded to nearest; a finite value that float32
    cannot hold is an error rather than an infinity."""
    v = np.asarray(value)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got {v.dtype}")
    with np.errstate(over="ignore"):
        converted = v.astype(np.float32)
    if v.dtype.kind == "f" and np.any(np.isinf(converted) & np.isfinite(v)):
        raise ValueError(f"{name} has values beyond float32's range (largest magnitude {np.abs(v).max():g})")
    return converted


def fold_batchnorm(weight, bias, gamma, beta, mean, var, eps: float = 1e-5) -> Tuple[np.ndarray, np.ndarray]:
    """Fold inference BatchNorm into the preceding 1x1 convolution.

    ``bn(conv(x, w, b)) = conv(x, w', b')`` with ``s = gamma / sqrt(var + eps)``, ``w' = w * s``
    (per output channel) and ``b' = (b - mean) * s + beta``. Computed in float64, returned as
    float32; ``weight`` keeps its shape ((K, C) or (K, C, 1, 1)); ``bias`` may be None.
    """
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"weight must be a real numeric array, got {w.dtype}")
    if w.ndim not in (2, 4) or (w.ndim == 4 and w.shape[2:] != (1, 1)):
        raise ValueError(f"weight must have shape (K, C) or (K, C, 1, 1), got {w.shape}")
    k = w.shape[0]
    eps = _eps(eps)
    b = np.zeros(k) if bias is None else _vector("bias", bias, k)
    gamma, beta = _vector("gamma", gamma, k), _vector("beta", beta, k)
    mean, var = _vector("mean", mean, k), _vector("var", var, k)
    if np.any(var + eps <= 0):
        raise ValueError("var + eps must be positive")
    scale = gamma / np.sqrt(var + eps)
    folded_w = w.astype(np.float64) * scale.reshape((k,) + (1,) * (w.ndim - 1))
    folded_b = (b - mean) * scale + beta
    return _float32_parameter("the folded weight", folded_w), _float32_parameter("the folded bias", folded_b)


class PointwiseConvBlock:
    """1x1 convolution -> BatchNorm (inference statistics) -> activation, as one call.

    BatchNorm is folded into the convolution's weights and bias whenever the parameters change,
    so a call costs one fused pwcpu convolution. Parameters use PyTorch's names and shapes, either
    a module's with children ``conv`` and ``bn`` or a ``Sequential(conv, bn, act)``'s (``0.``,
    ``1.``): ``conv.weight`` (K, C // groups, 1, 1), optionally ``conv.bias`` (K,), ``bn.weight``,
    ``bn.bias``, ``bn.running_mean``, ``bn.running_var`` (K,); ``bn.num_batches_tracked`` is
    accepted and ignored. A new block holds PyTorch's initial values (Kaiming-uniform convolution
    weights, no convolution bias, identity BatchNorm).
    """

    _BN_KEYS = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    _OPTIONAL_KEYS = ("conv.bias", "bn.num_batches_tracked")
    _SEQUENTIAL_PREFIXES = {"0.": "conv.", "1.": "bn."}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: IntPair = 1,
        padding: IntPair = 0,
        groups: int = 1,
        activation: Optional[str] = "relu",
        eps: float = 1e-5,
        layout: str = "NHWC",
        precision: str = "fp32",
    ) -> None:
        self.in_channels = _int("in_channels", in_channels, 0)
        self.out_channels = _int("out_channels", out_channels, 0)
        self.groups = _int("groups", groups, 1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels and out_channels")
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        _activation_code(activation)
        self.activation = activation
        self.eps = _eps(eps)
        _layout_code(layout)
        self.layout = layout
        _precision_code(precision)
        self.precision = precision  # of the fused convolution: BatchNorm is folded in float64 first
        k, cg = self.out_channels, self.in_channels // self.groups
        bound = 1.0 / np.sqrt(cg) if cg else 0.0
        params: Dict[str, np.ndarray] = {
            "conv.weight": np.random.default_rng().uniform(-bound, bound, (k, cg, 1, 1)).astype(np.float32),
            "bn.weight": np.ones(k, np.float32),
            "bn.bias": np.zeros(k, np.float32),
            "bn.running_mean": np.zeros(k, np.float32),
            "bn.running_var": np.ones(k, np.float32),
        }
        self._params, self._layer = params, self._fold(params)

    def _expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        k, cg = self.out_channels, self.in_channels // self.groups
        shapes = {"conv.weight": (k, cg, 1, 1), "conv.bias": (k,)}
        shapes.update({key: (k,) for key in self._BN_KEYS})
        return shapes

    @classmethod
    def _module_name(cls, key):
        """A Sequential's child index as the block's child name: ``1.bias`` -> ``bn.bias``."""
        prefix = str(key)[:2]
        return cls._SEQUENTIAL_PREFIXES[prefix] + str(key)[2:] if prefix in cls._SEQUENTIAL_PREFIXES else key

    def load_state_dict(self, state_dict) -> None:
        """Load parameters by PyTorch's names, from NumPy arrays (or anything array-like).

        Either every parameter loads and the block computes with them, or an error is raised and
        the block is unchanged.
        """
        state = {self._module_name(key): value for key, value in dict(state_dict).items()}
        shapes = self._expected_shapes()
        required = set(shapes) - {"conv.bias"}
        missing = sorted(required - set(state))
        unexpected = sorted(set(state) - set(shapes) - set(self._OPTIONAL_KEYS))
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the block: missing keys {missing}, unexpected keys {unexpected}")
        params = {}
        for key, shape in shapes.items():
            if key not in state:
                continue
            value = _float32_parameter(key, state[key])
            if value.shape != shape:
                raise ValueError(f"{key} must have shape {shape}, got {value.shape}")
            params[key] = value
        layer = self._fold(params)  # may raise: nothing is replaced before it succeeds
        self._params, self._layer = params, layer

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters, by PyTorch's names."""
        return {key: value.copy() for key, value in self._params.items()}

    def _fold(self, p: Dict[str, np.ndarray]) -> PointwiseConv:
        weight, bias = fold_batchnorm(p["conv.weight"][:, :, 0, 0], p.get("conv.bias"), p["bn.weight"], p["bn.bias"],
                                      p["bn.running_mean"], p["bn.running_var"], self.eps)
        return PointwiseConv(weight, bias, stride=self.stride, padding=self.padding, groups=self.groups,
                             activation=self.activation, layout=self.layout, precision=self.precision)

    @property
    def layer(self) -> PointwiseConv:
        """The fused convolution (folded weights and bias) that a call runs."""
        return self._layer

    def __call__(self, x, *, residual=None, out: Optional[np.ndarray] = None) -> np.ndarray:
        return self.layer(x, residual=residual, out=out)

    def __repr__(self) -> str:
        return (f"PointwiseConvBlock({self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, activation={self.activation!r}, eps={self.eps}, "
                f"layout={self.layout!r}, precision={self.precision!r})")
