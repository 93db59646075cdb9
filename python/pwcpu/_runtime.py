"""Thread control and runtime introspection."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from typing import Any, Dict, Iterator

from . import _core

__all__ = ["get_num_threads", "set_num_threads", "num_threads", "runtime_info", "show_runtime"]


def get_num_threads() -> int:
    """Threads one call uses: the last :func:`set_num_threads`, capped by OpenMP's setting for the
    calling thread (``OMP_NUM_THREADS``, ``threadpoolctl``), which is the default."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads used by each call (process-wide)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _core.set_num_threads(n)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """``with pwcpu.num_threads(1): ...`` runs the block with ``n`` threads, then restores."""
    previous = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)


def runtime_info() -> Dict[str, Any]:
    """What pwcpu found and chose: version, CPU features, ISA and kernels (and why), threads, caches."""
    info = dict(_core.runtime_info())
    info["version"] = _core.__version__
    info["threads"] = get_num_threads()
    info["PWCPU_ISA"] = os.environ.get("PWCPU_ISA")
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    info["python"] = sys.version.split()[0]
    info["machine"] = platform.machine()
    return info


def show_runtime() -> None:
    """Print :func:`runtime_info` in a readable form (as ``python -m pwcpu info`` does)."""
    info = runtime_info()
    kib = 1024
    lines = [
        f"pwcpu {info['version']} (Python {info['python']}, {info['machine']})",
        f"CPU features:   {' '.join(info['cpu_features']) or '(none detected)'}",
        f"ISAs available: {', '.join(info['supported_isas'])}",
        f"ISA in use:     {info['isa']} ({info['isa_reason']})",
        f"kernels:        {info['kernel_main']} (wide), {info['kernel_narrow']} (narrow)",
        f"threads:        {info['threads']} (OMP_NUM_THREADS={info['OMP_NUM_THREADS']})"
        + (" - single-threaded: forked after pwcpu ran threads" if info["single_threaded_after_fork"] else ""),
        f"caches:         L1d {info['l1d_bytes'] // kib} KiB, L2 {info['l2_bytes'] // kib} KiB, "
        f"L3 {info['l3_bytes'] // kib} KiB",
        f"outputs from {info['stream_store_min_bytes'] // kib} KiB are written past the caches (non-temporal stores)",
    ]
    print("\n".join(lines))
