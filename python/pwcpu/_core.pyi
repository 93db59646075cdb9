"""Type stubs for pwcpu's compiled core (pwcpu._core)."""

from typing import Any, Dict, Optional

import numpy as np
import numpy.typing as npt

__version__: str

class ConvPlan:
    """Packed weights plus a layer's options; validates and runs calls."""

    def __init__(
        self,
        weight: npt.NDArray[np.float32],
        bias: Optional[npt.NDArray[np.float32]],
        groups: int,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        activation: int,
        weights_private: bool,
        layout: int = 0,
        precision: int = 0,
    ) -> None: ...
    def conv(self, x: Any, residual: Any, out: Optional[np.ndarray]) -> npt.NDArray[np.float32]: ...
    def conv_bfloat16(
        self, x_bits: npt.NDArray[np.uint16], residual: Any, out: Optional[np.ndarray]
    ) -> npt.NDArray[np.float32]: ...
    def conv_bfloat16_into(
        self, x_bits: npt.NDArray[np.uint16], out_bits: npt.NDArray[np.uint16]
    ) -> npt.NDArray[np.uint16]: ...
    @property
    def reads_bfloat16(self) -> bool: ...
    def pointwise(self, x: Any, residual: Any, out: Optional[np.ndarray]) -> npt.NDArray[np.float32]: ...
    @property
    def isa(self) -> str: ...
    @property
    def kernel(self) -> str: ...
    @property
    def precision(self) -> int: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def out_channels(self) -> int: ...

class QuantizedConvPlan:
    """Static int8 weights and quantization parameters (ONNX QLinearConv, 1x1, NHWC)."""

    def __init__(
        self,
        weight: np.ndarray,
        w_scale: npt.NDArray[np.float32],
        w_zero_point: npt.NDArray[np.int32],
        bias: Optional[npt.NDArray[np.int32]],
        groups: int,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        x_scale: float,
        x_zero_point: int,
        x_signed: bool,
        y_scale: float,
        y_zero_point: int,
        y_signed: bool,
    ) -> None: ...
    def conv(self, x: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray: ...
    @property
    def isa(self) -> str: ...
    @property
    def kernel(self) -> str: ...

class DepthwisePlan:
    """Packed depthwise filters plus a layer's options; validates and runs calls."""

    def __init__(
        self,
        weight: npt.NDArray[np.float32],
        bias: Optional[npt.NDArray[np.float32]],
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        activation: int,
        weights_private: bool,
    ) -> None: ...
    def conv(self, x: Any, residual: Any, out: Optional[np.ndarray]) -> npt.NDArray[np.float32]: ...
    @property
    def isa(self) -> str: ...
    @property
    def kernel(self) -> str: ...
    @property
    def channels(self) -> int: ...

class DenseConvPlan:
    """Packed dense-convolution weights (K, C, kh, kw) plus a layer's options; validates and runs calls."""

    def __init__(
        self,
        weight: npt.NDArray[np.float32],
        bias: Optional[npt.NDArray[np.float32]],
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        activation: int,
        weights_private: bool,
        groups: int = 1,
    ) -> None: ...
    def conv(self, x: Any, residual: Any, out: Optional[np.ndarray]) -> npt.NDArray[np.float32]: ...
    @property
    def isa(self) -> str: ...
    @property
    def kernel(self) -> str: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def out_channels(self) -> int: ...
    @property
    def groups(self) -> int: ...

class BlockPlan:
    """A fused inverted residual block's packed weights; validates and runs calls."""

    def __init__(
        self,
        expand_weight: Optional[npt.NDArray[np.float32]],
        expand_bias: Optional[npt.NDArray[np.float32]],
        depthwise_weight: npt.NDArray[np.float32],
        depthwise_bias: Optional[npt.NDArray[np.float32]],
        project_weight: npt.NDArray[np.float32],
        project_bias: Optional[npt.NDArray[np.float32]],
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        expand_activation: int,
        depthwise_activation: int,
        project_activation: int,
        residual: bool,
        se_reduce_weight: Optional[npt.NDArray[np.float32]] = None,
        se_reduce_bias: Optional[npt.NDArray[np.float32]] = None,
        se_expand_weight: Optional[npt.NDArray[np.float32]] = None,
        se_expand_bias: Optional[npt.NDArray[np.float32]] = None,
        se_activation: int = 3,
        se_gate: int = 6,
    ) -> None: ...
    def conv(self, x: Any, out: Optional[np.ndarray]) -> npt.NDArray[np.float32]: ...
    @property
    def isa(self) -> str: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def out_channels(self) -> int: ...

def output_array(floats: int) -> npt.NDArray[np.float32]: ...
def as_float32(value: Any, name: str) -> npt.NDArray[np.float32]: ...
def interleave_channels(out_data: int, sources: list[tuple[int, tuple[int, ...], tuple[int, ...]]]) -> None: ...
def channel_means(out_data: int, x_data: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> None: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def measure_fma_peak_gflops(threads: int, seconds: float) -> float: ...
def select_isa(name: str) -> None: ...
def set_max_reduction_block(channels: int) -> None: ...
def set_take_rows_first(first: bool) -> None: ...
def active_isa() -> str: ...
def runtime_info() -> Dict[str, Any]: ...
