"""pwcpu: fast pointwise (1x1) convolution on the CPU, with a NumPy API.

The core is C++ SIMD/OpenMP microkernels (AVX-512, AVX2 and a portable path, chosen at run time;
``PWCPU_ISA=scalar|avx2|avx512`` forces one) driven as a cache-tiled GEMM over NHWC data.
"""

from . import _core, reference
from ._api import (
    ACTIVATIONS,
    PRECISIONS,
    DenseConv,
    DepthwiseConv,
    DepthwiseSeparable,
    InvertedResidual,
    PointwiseConv,
    conv1x1,
    conv2d,
    depthwise_conv2d,
    pointwise,
)
from ._block import PointwiseConvBlock, fold_batchnorm
from ._quantized import QuantizedPointwiseConv, qlinear_conv1x1
from ._runtime import get_num_threads, num_threads, runtime_info, set_num_threads, show_runtime

__version__ = _core.__version__

_core.active_isa()  # an unknown or unsupported PWCPU_ISA is an error at import, not at first call

__all__ = [
    "ACTIVATIONS",
    "PRECISIONS",
    "DenseConv",
    "DepthwiseConv",
    "DepthwiseSeparable",
    "InvertedResidual",
    "PointwiseConv",
    "PointwiseConvBlock",
    "QuantizedPointwiseConv",
    "__version__",
    "conv1x1",
    "conv2d",
    "depthwise_conv2d",
    "fold_batchnorm",
    "get_num_threads",
    "num_threads",
    "pointwise",
    "qlinear_conv1x1",
    "reference",
    "runtime_info",
    "set_num_threads",
    "show_runtime",
]
