"""Pointwise layers over Dask arrays: arrays larger than one machine, on a Dask cluster.

Needs ``dask[array]`` (and ``distributed`` for a cluster): ``pip install "pwcpu[dask]"``.
Importing pwcpu alone never imports Dask.

Every function takes a ``dask.array.Array`` and returns a lazy one of the right shape, chunks and
dtype, equal bit for bit to the in-memory call on the same data, whatever the chunking:

- the channel axis is brought into one chunk where it is split (a :class:`PwcpuDaskWarning` says
  so), other axes keep their chunks;
- stride and padding are applied to the lazy array first (zero padding, then a strided slice),
  so chunks need not divide the stride;
- the packed layer enters the graph once, as one key that each worker fetches once, not once per
  task;
- a task runs on at most the threads of the worker that runs it, shared among that worker's
  concurrent tasks (Dask's worker processes start with ``OMP_NUM_THREADS=1``, which makes every
  task single-threaded: the efficient choice when a worker runs as many tasks as it has threads).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import dask
import dask.array as da
import numpy as np

from ._api import PointwiseConv, _float32_array
from ._runtime import num_threads

__all__ = ["PwcpuDaskWarning", "apply", "conv1x1", "pointwise"]


class PwcpuDaskWarning(UserWarning):
    """The channel axis of a Dask array was split over chunks and has been rechunked into one."""


def _check_array(x, name: str, ndim: Optional[int] = None) -> da.Array:
    if not isinstance(x, da.Array):
        raise TypeError(f"{name} must be a dask.array.Array, got {type(x).__name__} (use pwcpu's NumPy functions "
                        "for in-memory arrays)")
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype} (use {name}.astype(np.float32))")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes (N, H, W, C), got shape {x.shape}")
    if ndim is None and x.ndim < 1:
        raise ValueError(f"{name} must have a channel axis, got shape {x.shape}")
    return x


def _channels_in_one_chunk(x: da.Array, name: str) -> da.Array:
    if len(x.chunks[-1]) > 1:
        warnings.warn(f"{name}'s channel axis is split over {len(x.chunks[-1])} chunks; pwcpu rechunks it into one "
                      "(each output pixel needs all of its channels)", PwcpuDaskWarning, stacklevel=3)
        x = x.rechunk({x.ndim - 1: -1})
    return x


def _worker_threads() -> Optional[int]:
    """The threads of the Dask worker running this task, or None outside a distributed worker."""
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        worker = get_worker()
    except ValueError:  # not in a worker: local schedulers, or the client
        return None
    return worker.state.nthreads


def _task_threads():
    """A scope in which pwcpu calls from this task use at most its worker's threads."""
    threads = _worker_threads()
    return num_threads(threads) if threads else contextlib.nullcontext()


def _conv_block(x: np.ndarray, layer: PointwiseConv, residual: Optional[np.ndarray] = None) -> np.ndarray:
    with _task_threads():
        return layer(x, residual=residual)


def _pointwise_block(x: np.ndarray, layer: PointwiseConv, residual: Optional[np.ndarray] = None) -> np.ndarray:
    with _task_threads():
        return layer._plan.pointwise(x, residual, None)


def _with_residual(residual, shape: tuple, chunks: tuple) -> Optional[da.Array]:
    if residual is None:
        return None
    residual = _check_array(residual, "residual")
    if residual.shape != shape:
        raise ValueError(f"residual must have the output's shape {shape}, got {residual.shape}")
    return residual.rechunk(chunks)


def _padded_chunks(chunks: tuple, pad: int) -> tuple:
    """An axis's chunks with ``pad`` more at each end, added to the first and last chunk."""
    if not chunks:
        return (2 * pad,) if pad else chunks
    grown = list(chunks)
    grown[0] += pad
    grown[-1] += pad
    return tuple(grown)


def _stride1_layer(layer: PointwiseConv) -> PointwiseConv:
    """The layer's weights and epilogue without its stride and padding (applied to the lazy input)."""
    if layer.stride == (1, 1) and layer.padding == (0, 0):
        return layer
    return PointwiseConv(layer.weight, layer.bias, groups=layer.groups, activation=layer.activation,
                         precision=layer.precision)


def apply(layer: PointwiseConv, x, *, residual=None) -> da.Array:
    """``layer(x, residual=residual)`` for a Dask array x (N, H, W, C): lazy, chunked as x."""
    if not isinstance(layer, PointwiseConv):
        raise TypeError(f"layer must be a pwcpu.PointwiseConv, got {type(layer).__name__}")
    if layer.layout != "NHWC":
        raise ValueError("Dask arrays are taken in NHWC layout only; move the channel axis last (x.transpose(0, 2, 3, 1))")
    x = _channels_in_one_chunk(_check_array(x, "x", 4), "x")
    if x.shape[3] != layer.in_channels:
        raise ValueError(f"x has {x.shape[3]} channels but the layer expects C = {layer.in_channels}")
    (ph, pw), (sh, sw) = layer.padding, layer.stride
    if ph or pw:
        chunks = x.chunks
        x = da.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        # The padding comes as chunks of its own: merged into the edge chunks, not tasks of their own.
        x = x.rechunk({1: _padded_chunks(chunks[1], ph), 2: _padded_chunks(chunks[2], pw)})
    if sh != 1 or sw != 1:
        x = x[:, ::sh, ::sw, :]
    k = layer.out_channels
    chunks = x.chunks[:3] + ((k,),)
    res = _with_residual(residual, x.shape[:3] + (k,), chunks)
    packed = dask.delayed(_stride1_layer(layer), pure=True)  # one key, fetched once per worker
    args = (x, packed) if res is None else (x, packed, res)
    return da.map_blocks(_conv_block, *args, dtype=np.float32, chunks=chunks,
                         meta=np.empty((0, 0, 0, 0), np.float32), name="pwcpu-conv1x1")


def conv1x1(x, weight, bias=None, *, stride=1, padding=0, groups=1, activation: Optional[str] = None,
            residual=None, precision: str = "fp32") -> da.Array:
    """:func:`pwcpu.conv1x1` on a Dask array x (N, H, W, C), NHWC: a lazy (N, Ho, Wo, K) array.

    ``weight`` may also be a :class:`pwcpu.PointwiseConv` (then ``bias`` and the options must be
    left at their defaults: the layer has its own)."""
    if isinstance(weight, PointwiseConv):
        if (bias is not None or stride != 1 or padding != 0 or groups != 1 or activation is not None
                or precision != "fp32"):
            raise ValueError("with a PointwiseConv, pass bias, stride, padding, groups, activation and precision "
                             "to the layer")
        layer = weight
    else:
        layer = PointwiseConv(_float32_array("weight", weight), bias, stride=stride, padding=padding, groups=groups,
                              activation=activation, precision=precision)
    return apply(layer, x, residual=residual)


def pointwise(x, weight, bias=None, *, activation: Optional[str] = None, residual=None,
              precision: str = "fp32") -> da.Array:
    """:func:`pwcpu.pointwise` on a Dask array x (..., C): a lazy (..., K) array, chunked as x
    along the leading axes. ``weight`` may be a :class:`pwcpu.PointwiseConv` without stride,
    padding or groups (then ``bias`` and ``activation`` belong to it)."""
    if isinstance(weight, PointwiseConv):
        if bias is not None or activation is not None or precision != "fp32":
            raise ValueError("with a PointwiseConv, pass bias, activation and precision to the layer")
        if weight.stride != (1, 1) or weight.padding != (0, 0) or weight.groups != 1:
            raise ValueError("pointwise takes a PointwiseConv without stride, padding or groups")
        layer = weight
    else:
        layer = PointwiseConv(_float32_array("weight", weight), bias, activation=activation, precision=precision)
    x = _channels_in_one_chunk(_check_array(x, "x"), "x")
    if x.shape[-1] != layer.in_channels:
        raise ValueError(f"x has {x.shape[-1]} channels but weight expects C = {layer.in_channels}")
    k = layer.out_channels
    chunks = x.chunks[:-1] + ((k,),)
    res = _with_residual(residual, x.shape[:-1] + (k,), chunks)
    packed = dask.delayed(layer, pure=True)
    args = (x, packed) if res is None else (x, packed, res)
    return da.map_blocks(_pointwise_block, *args, dtype=np.float32, chunks=chunks,
                         meta=np.empty((0,) * x.ndim, np.float32), name="pwcpu-pointwise")
