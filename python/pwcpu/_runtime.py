"""Thread control and runtime introspection."""

from __future__ import annotations

import contextlib
import numbers
import os
import platform
import sys
from typing import Any, Dict, Iterator

import numpy as np

from . import _core

# No CPU runs this many threads; larger requests are capped by OpenMP's setting anyway.
_MAX_THREADS = 2**16

__all__ = ["get_num_threads", "set_num_threads", "num_threads", "runtime_info", "show_runtime"]


def get_num_threads() -> int:
    """Threads one call from this thread uses: the innermost :func:`num_threads` block of this
    thread, else the last :func:`set_num_threads`, never more than OpenMP's setting for the calling
    thread (``OMP_NUM_THREADS``, ``threadpoolctl``, else the number of cores), which is the default."""
    return _core.get_num_threads()


def _thread_count(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return min(int(n), _MAX_THREADS)  # OpenMP's setting caps it anyway


def set_num_threads(n: int) -> None:
    """Set pwcpu's thread count for the whole process.

    It never exceeds OpenMP's setting (``OMP_NUM_THREADS``, else the number of cores), and it does
    not change that setting: PyTorch and other libraries sharing the OpenMP runtime keep theirs.
    """
    _core.set_num_threads(_thread_count(n))


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """``with pwcpu.num_threads(1): ...``: calls made from *this* thread inside the block use ``n``
    threads (capped as in :func:`set_num_threads`). Blocks nest, and blocks in other threads do
    not interfere."""
    previous = _core.set_num_threads_for_this_thread(_thread_count(n))
    try:
        yield
    finally:
        _core.set_num_threads_for_this_thread(previous)


def runtime_info() -> Dict[str, Any]:
    """What pwcpu found and chose: version, CPU features, ISA and kernels (and why), threads, caches."""
    info = dict(_core.runtime_info())
    info["version"] = _core.__version__
    info["threads"] = get_num_threads()
    info["PWCPU_ISA"] = os.environ.get("PWCPU_ISA")
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    info["python"] = sys.version.split()[0]
    info["machine"] = platform.machine()
    info["cpu_model"] = _cpu_model()
    return info


def _cpu_model() -> str:
    """The CPU's model name with its family and model numbers (Linux; virtual machines often show
    only a vendor name, and the numbers tell the generation), else what the platform module says."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
    return fields["model name"] + numbers


# How each ISA's own bf16 kernels multiply (elsewhere: the float32 kernels on rounded operands).
_BF16_SUMS = {"avx512bf16": "vdpbf16ps pairs", "avx512amx": "AMX tiles (tdpbf16ps)"}
_INT8_SUMS = {"avx512vnni": "vpdpbusd quads", "avx512amx": "AMX tiles of quads (tdpbusd)"}


def show_runtime() -> None:
    """Print :func:`runtime_info` in a readable form (as ``python -m pwcpu info`` does)."""
    info = runtime_info()
    kib = 1024
    lines = [
        f"pwcpu {info['version']} (Python {info['python']}, {info['machine']})",
        f"CPU:            {info['cpu_model']}",
        f"CPU features:   {' '.join(info['cpu_features']) or '(none detected)'}",
        f"ISAs available: {', '.join(info['supported_isas'])}",
        f"ISA in use:     {info['isa']} ({info['isa_reason']})",
        f"kernels:        {', '.join(info['gemm_kernels'])} (1x1, each layer the best fit for its output "
        f"channels, by their relative speeds: {', '.join(f'{s:.2f}' for s in info['gemm_kernel_speeds'])}), "
        f"{info['kernel_depthwise']} (depthwise)",
        f"bf16 kernels:   {', '.join(info['bf16_gemm_kernels'])} (precision='bf16', float32 sums: "
        f"{_BF16_SUMS.get(info['bf16_isa'], 'the float32 kernels on rounded operands')}; "
        f"{info['bf16_isa_reason']})",
        f"int8 kernels:   {', '.join(info['int8_gemm_kernels'])} (precision='int8' and static int8: exact int32 "
        f"sums of {_INT8_SUMS.get(info['int8_isa'], 'int16 pairs')}; {info['int8_isa_reason']})",
        f"threads:        {info['threads']} (OMP_NUM_THREADS={info['OMP_NUM_THREADS']})"
        + (" - single-threaded: forked after pwcpu ran threads" if info["single_threaded_after_fork"] else ""),
        f"caches:         L1d {info['l1d_bytes'] // kib} KiB, L2 {info['l2_bytes'] // kib} KiB, "
        f"L3 {info['l3_bytes'] // kib} KiB",
        f"outputs from {info['stream_store_min_bytes'] // kib} KiB are written past the caches (non-temporal stores)",
    ]
    print("\n".join(lines))
