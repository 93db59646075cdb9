"""pwcpu against its peers on real network layers: ``python -m pwcpu bench``.

Every implementation computes the same layer (NHWC input, K x C weights, bias) in the same process
with the same thread count; implementations are timed in interleaved rounds and each reports the
median, so that drifts of the machine hit all of them alike. Peers that are not installed are
skipped with a note (``pip install "pwcpu[bench]"`` installs them all):

- ``numpy``:  ``x.reshape(-1, C) @ w.T + b`` (NumPy's BLAS, OpenBLAS in the wheels)
- ``torch.mm``: the same GEMM through PyTorch (MKL / oneDNN)
- ``torch.conv2d``: ``F.conv2d`` on a channels_last tensor (oneDNN)
- ``onnxruntime``: a one-node ONNX Conv (MLAS)
- ``tflite``: a one-layer ``tf.nn.conv2d`` model through the TFLite interpreter (XNNPACK)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import _core, reference
from ._api import PointwiseConv
from ._runtime import num_threads, runtime_info


@dataclass(frozen=True)
class Layer:
    network: str
    n: int
    h: int
    w: int
    c: int
    k: int
    stride: int = 1

    @property
    def out_hw(self) -> Tuple[int, int]:
        return (self.h - 1) // self.stride + 1, (self.w - 1) // self.stride + 1

    @property
    def flops(self) -> float:
        ho, wo = self.out_hw
        return 2.0 * self.n * ho * wo * self.c * self.k

    @property
    def label(self) -> str:
        s = f"/{self.stride}" if self.stride != 1 else ""
        return f"{self.network} {self.n}x{self.h}x{self.w}x{self.c}->{self.k}{s}"


def _layers(network: str, shapes: Sequence[Tuple[int, ...]]) -> List[Layer]:
    return [Layer(network, *shape) for shape in shapes]


# MobileNetV2 and ResNet-50 pointwise layers at 224x224, batch 1; batched layers and Transformer
# feed-forward layers (N, H, W, C, K, stride).
LAYERS: List[Layer] = (
    _layers("mobilenetv2", [
        (1, 112, 112, 32, 16, 1), (1, 112, 112, 16, 96, 1), (1, 56, 56, 96, 24, 1), (1, 56, 56, 24, 144, 1),
        (1, 56, 56, 144, 24, 1), (1, 28, 28, 144, 32, 1), (1, 28, 28, 32, 192, 1), (1, 28, 28, 192, 32, 1),
        (1, 14, 14, 192, 64, 1), (1, 14, 14, 64, 384, 1), (1, 14, 14, 384, 64, 1), (1, 14, 14, 384, 96, 1),
        (1, 14, 14, 96, 576, 1), (1, 14, 14, 576, 96, 1), (1, 7, 7, 576, 160, 1), (1, 7, 7, 160, 960, 1),
        (1, 7, 7, 960, 160, 1), (1, 7, 7, 960, 320, 1), (1, 7, 7, 320, 1280, 1),
    ])
    + _layers("resnet50", [
        (1, 56, 56, 256, 64, 1), (1, 56, 56, 64, 256, 1), (1, 56, 56, 256, 512, 2), (1, 28, 28, 512, 128, 1),
        (1, 28, 28, 128, 512, 1), (1, 14, 14, 1024, 256, 1), (1, 14, 14, 256, 1024, 1), (1, 7, 7, 2048, 512, 1),
        (1, 7, 7, 512, 2048, 1),
    ])
    + _layers("batched", [(8, 56, 56, 64, 256, 1), (8, 56, 56, 24, 144, 1)])
    + _layers("ffn", [(1, 1, 512, 768, 3072, 1), (1, 1, 512, 3072, 768, 1)])
)

SUITES = {
    "all": LAYERS,
    "mobilenetv2": [layer for layer in LAYERS if layer.network == "mobilenetv2"],
    "resnet50": [layer for layer in LAYERS if layer.network == "resnet50"],
    "networks": [layer for layer in LAYERS if layer.network in ("mobilenetv2", "resnet50")],
}


# ---- implementations ------------------------------------------------------------------------

Runner = Callable[[], object]


@dataclass
class LayerData:
    layer: Layer
    x: np.ndarray  # NHWC float32
    weight: np.ndarray  # (K, C)
    bias: np.ndarray

    @classmethod
    def random(cls, layer: Layer, seed: int = 0) -> "LayerData":
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((layer.n, layer.h, layer.w, layer.c), dtype=np.float32)
        weight = rng.standard_normal((layer.k, layer.c), dtype=np.float32) / np.float32(math.sqrt(layer.c))
        bias = rng.standard_normal(layer.k, dtype=np.float32)
        return cls(layer, x, weight, bias)

    def reference(self, precision: str = "fp32") -> np.ndarray:
        s = self.layer.stride
        x = self.x[:, ::s, ::s, :]
        return reference.conv1x1(x, self.weight, self.bias, precision=precision)


def make_pwcpu(d: LayerData, threads: int) -> Runner:
    layer = PointwiseConv(d.weight, d.bias, stride=d.layer.stride)
    out = layer(d.x)  # an output array as pwcpu allocates it (cache-line aligned), reused
    return lambda: layer(d.x, out=out)


def make_numpy(d: LayerData, threads: int) -> Runner:
    s, c = d.layer.stride, d.layer.c
    wt = np.ascontiguousarray(d.weight.T)
    out = np.empty((d.layer.n * d.layer.out_hw[0] * d.layer.out_hw[1], d.layer.k), np.float32)

    def run():
        x = d.x if s == 1 else np.ascontiguousarray(d.x[:, ::s, ::s, :])
        np.matmul(x.reshape(-1, c), wt, out=out)
        return np.add(out, d.bias, out=out)

    return run


def make_torch_mm(d: LayerData, threads: int) -> Runner:
    import torch

    s, c = d.layer.stride, d.layer.c
    x = torch.from_numpy(d.x)
    wt = torch.from_numpy(np.ascontiguousarray(d.weight.T))
    b = torch.from_numpy(d.bias)

    def run():
        with torch.inference_mode():
            xs = x if s == 1 else x[:, ::s, ::s, :].contiguous()
            return torch.addmm(b, xs.reshape(-1, c), wt)

    return run


def make_torch_conv2d(d: LayerData, threads: int) -> Runner:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(d.x).permute(0, 3, 1, 2)  # NCHW shape over NHWC memory: channels_last
    w = torch.from_numpy(d.weight)[:, :, None, None].contiguous(memory_format=torch.channels_last)
    b = torch.from_numpy(d.bias)
    s = d.layer.stride

    def run():
        with torch.inference_mode():
            return F.conv2d(x, w, b, stride=s)

    return run


def make_onnxruntime(d: LayerData, threads: int) -> Runner:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    layer = d.layer
    ho, wo = layer.out_hw
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[1, 1], strides=[layer.stride] * 2)
    graph = helper.make_graph(
        [node], "conv1x1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [layer.n, layer.c, layer.h, layer.w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [layer.n, layer.k, ho, wo])],
        initializer=[numpy_helper.from_array(d.weight[:, :, None, None], "w"), numpy_helper.from_array(d.bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString(),
                                   options, providers=["CPUExecutionProvider"])
    x_nchw = np.ascontiguousarray(d.x.transpose(0, 3, 1, 2))  # ORT's Conv is NCHW; layout set up once
    return lambda: session.run(None, {"x": x_nchw})


def _tflite_runner(model_content: bytes, x: np.ndarray, threads: int) -> Runner:
    """A TFLite interpreter (XNNPACK) on ``threads`` threads for the model, its input set to x."""
    import tensorflow as tf

    with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=model_content, num_threads=threads)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    output_index = interpreter.get_output_details()[0]["index"]

    def run():
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    return run


def make_tflite(d: LayerData, threads: int, int8: bool = False) -> Runner:
    """The layer as a one-layer TFLite model; with ``int8``, quantized by TFLite's converter from
    the layer's own input as the representative data (int8 in and out, per-channel weights: XNNPACK's
    qs8 kernels), its input quantized with the model's parameters."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    layer = d.layer
    w_hwio = tf.constant(d.weight.T[None, None, :, :])
    b = tf.constant(d.bias)

    @tf.function(input_signature=[tf.TensorSpec([layer.n, layer.h, layer.w, layer.c], tf.float32)])
    def conv(x):
        return tf.nn.conv2d(x, w_hwio, strides=layer.stride, padding="VALID") + b

    converter = tf.lite.TFLiteConverter.from_concrete_functions([conv.get_concrete_function()], conv)
    if not int8:
        return _tflite_runner(converter.convert(), d.x, threads)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter([[d.x]])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = converter.convert()
        details = tf.lite.Interpreter(model_content=model).get_input_details()[0]
    scale, zero_point = details["quantization"]
    xq = np.clip(np.rint(d.x / scale) + zero_point, -128, 127).astype(np.int8)
    return _tflite_runner(model, xq, threads)


PEERS: Dict[str, Callable[[LayerData, int], Runner]] = {
    "numpy": make_numpy,
    "torch.mm": make_torch_mm,
    "torch.conv2d": make_torch_conv2d,
    "onnxruntime": make_onnxruntime,
    "tflite": make_tflite,
}
PEER_MODULES = {"numpy": "numpy", "torch.mm": "torch", "torch.conv2d": "torch", "onnxruntime": "onnxruntime",
                "tflite": "tensorflow"}


def available_peers(names: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """The peers among ``names`` that can be imported, and a note for each that cannot."""
    found, missing = [], {}
    for name in names:
        if importlib.util.find_spec(PEER_MODULES[name]) is None:
            missing[name] = f"{PEER_MODULES[name]} is not installed (pip install \"pwcpu[bench]\")"
        else:
            found.append(name)
    return found, missing


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Every library in the process (pwcpu, BLAS, OpenMP, PyTorch) limited to ``threads``."""
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(num_threads(threads))
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=threads))
        except ImportError:  # pragma: no cover - threadpoolctl is in the bench and test extras
            pass
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, previous)
        yield


def time_runners(runners: Dict[str, Runner], min_seconds: float, rounds: int, pause: float) -> Dict[str, float]:
    """Median seconds per call of each runner, over interleaved rounds.

    Thread pools keep spinning for a while after their work ends (OpenBLAS for tens of
    milliseconds); on a machine with few cores that steals the next implementation's cores. With
    ``pause`` > 0, every switch of implementation first waits that long, so each is timed on idle
    cores.
    """
    batch = {}
    for name, run in runners.items():
        time.sleep(pause)
        run()  # warm up: first-touch, JIT, caches
        start, calls = time.perf_counter(), 0
        while True:
            run()
            calls += 1
            if time.perf_counter() - start >= min_seconds / 4:
                break
        batch[name] = max(1, int(calls * (min_seconds / rounds) / (time.perf_counter() - start)))
    samples: Dict[str, List[float]] = {name: [] for name in runners}
    order = list(runners.items())
    for r in range(rounds):
        # Each round starts one implementation later: none always follows the same neighbour
        # (whose threads may still be spinning when the pause ends: OpenBLAS's spin for about
        # 2^28 cycles, a tenth of a second).
        for name, run in order[r % len(order):] + order[:r % len(order)]:
            if pause:
                time.sleep(pause)
                run()
            start = time.perf_counter()
            for _ in range(batch[name]):
                run()
            samples[name].append((time.perf_counter() - start) / batch[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _relative_rms(result, exact) -> float:
    """The RMS of the error over that of the exact result."""
    exact = np.asarray(exact, dtype=np.float64)
    error = np.asarray(result, dtype=np.float64).reshape(exact.shape) - exact
    return float(np.sqrt(np.mean(error**2) / np.mean(exact**2)))


def check_result(name: str, result, d: LayerData, precision: str = "fp32") -> None:
    """Every implementation must compute the same layer, or its timing means nothing."""
    if name == "onnxruntime":
        result = result[0].transpose(0, 2, 3, 1)
    elif name == "torch.conv2d":
        result = result.numpy().transpose(0, 2, 3, 1)
    result = np.asarray(result)
    expected = d.reference(precision)
    error = np.abs(result.reshape(expected.shape) - expected).max()
    if not error <= 1e-3 * max(1.0, float(np.abs(expected).max())):
        raise RuntimeError(f"{name} computed a different result on {d.layer.label} (max error {error:.3g})")


def bench_layer(layer: Layer, peers: Sequence[str], threads: int, min_seconds: float, rounds: int,
                pause: float, compared: Optional[Sequence[str]] = None) -> Dict:
    """pwcpu and the peers timed on one layer; the ratio is against the fastest of ``compared``
    (default: every peer)."""
    compared = peers if compared is None else compared
    d = LayerData.random(layer)
    runners = {"pwcpu": make_pwcpu(d, threads)}
    for name in peers:
        runners[name] = PEERS[name](d, threads)
    for name, run in runners.items():
        check_result(name, run(), d)
    seconds = time_runners(runners, min_seconds, rounds, pause if threads > 1 else 0.0)
    gflops = {name: layer.flops / s / 1e9 for name, s in seconds.items()}
    fastest_peer = max((gflops[n], n) for n in compared) if compared else (float("nan"), "")
    return {
        "layer": layer.label, "shape": [layer.n, layer.h, layer.w, layer.c, layer.k, layer.stride],
        "mflop": layer.flops / 1e6, "threads": threads, "gflops": gflops,
        "fastest_peer": fastest_peer[1], "ratio": gflops["pwcpu"] / fastest_peer[0] if compared else float("nan"),
    }


def _openblas_note() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return "threadpoolctl not installed: BLAS kernel unknown"
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    note = "NumPy BLAS: " + (", ".join(blas) or "none found")
    if os.environ.get("OPENBLAS_CORETYPE"):
        note += f"  [OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} forces that kernel; unset it for a fair run]"
    return note


# Environment that holds each library to an ISA; read when the library loads. ONNX Runtime (MLAS)
# and TFLite (XNNPACK) have no such switch: they run their best kernels, which a run reports.
ISA_PEER_LIMITS = {
    "avx2": {"PWCPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "OPENBLAS_CORETYPE": "Haswell"},
    "avx512": {"PWCPU_ISA": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "scalar": {"PWCPU_ISA": "scalar"},
}
# The peers those settings hold: ONNX Runtime (MLAS) and TFLite (XNNPACK) have no switch, and use
# the CPU's widest vectors whatever --isa says; they are timed and shown, outside the ratio.
ISA_HELD_PEERS = {"avx2": ("numpy", "torch.mm", "torch.conv2d"), "avx512": ("torch.mm", "torch.conv2d"), "scalar": ()}
_ISA_APPLIED = "PWCPU_BENCH_ISA_APPLIED"


def _rerun_with_isa(isa: str) -> int:
    """This command again, in a fresh process whose libraries load held to ``isa``."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_L2_SIZE"}
    env.update(ISA_PEER_LIMITS[isa])
    env[_ISA_APPLIED] = isa
    return subprocess.call([sys.executable, "-m", "pwcpu"] + sys.argv[1:], env=env)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts, e.g. 1,2 (default: pwcpu.get_num_threads())")
    parser.add_argument("--peers", default="numpy",
                        help=f"comma-separated peers, 'all' or 'none' (default numpy); known: {', '.join(PEERS)}")
    parser.add_argument("--suite", default="all", choices=sorted(SUITES), help="which layers (default all)")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing budget per implementation and layer")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds to let thread pools go idle between implementations (threads > 1); "
                             "OpenBLAS's threads spin for about 60 ms after each call")
    parser.add_argument("--depthwise", action="store_true",
                        help="instead of 1x1 layers: MobileNetV2's and EfficientNet-B0's depthwise layers, "
                             "against --peers among torch.conv2d, onnxruntime and tflite")
    parser.add_argument("--dense", action="store_true",
                        help="instead of 1x1 layers: dense convolutions (MobileNetV2's and ResNet-50's stems, "
                             "ResNet-50's 3x3 layers), against --peers among torch.conv2d, onnxruntime and tflite")
    parser.add_argument("--models", action="store_true",
                        help="instead of single layers: whole PyTorch models (ours, and torchvision's when installed) "
                             "converted with pwcpu.torch.convert, against PyTorch and ONNX Runtime (needs torch)")
    parser.add_argument("--model", default="",
                        help="with --models: only the models whose names contain one of these (comma-separated)")
    parser.add_argument("--dask", action="store_true",
                        help="pwcpu.dask on arrays of --dask-gib GiB on a LocalCluster of 2 (and 1) single-threaded "
                             "workers, against NumPy's x @ w.T + bias + activation per block (needs pwcpu[dask])")
    parser.add_argument("--dask-gib", type=float, default=1.0, help="with --dask: input size in GiB (default 1)")
    parser.add_argument("--overhead", action="store_true",
                        help="the PyTorch bridge's cost per call: converted layers against PointwiseConv from NumPy")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                        help="bf16: instead of peers, pwcpu with precision='bf16' against its fp32 and against "
                             "PyTorch's bf16 conv2d (channels_last), when installed; int8: pwcpu with "
                             "precision='int8' against its fp32, with its error against the fp32 result")
    parser.add_argument("--epilogue", action="store_true",
                        help="instead of peers: the cost of the fused epilogue, conv1x1 with bias + relu + "
                             "residual (out is residual) against the plain convolution")
    parser.add_argument("--isa", choices=sorted(ISA_PEER_LIMITS),
                        help="run pwcpu on this ISA's kernels (PWCPU_ISA) and hold the peers that can be held to it: "
                             "oneDNN (torch.conv2d), MKL (torch.mm) and OpenBLAS (NumPy); the run restarts itself "
                             "with those settings, which the libraries read when they load")
    parser.add_argument("--json", metavar="FILE", help="write all results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="grouped bars per layer and implementation (matplotlib)")


TORCHVISION_MODELS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "resnet50",
                      "regnet_y_400mf", "convnext_tiny")


def _model_builders() -> Dict[str, Callable]:
    """Our own MobileNetV2 and ResNet-50, and torchvision's models when torchvision is installed."""
    from . import torch_models

    builders: Dict[str, Callable] = {"mobilenet_v2 (pwcpu.torch_models)": torch_models.mobilenet_v2,
                                     "resnet50 (pwcpu.torch_models)": torch_models.resnet50}
    tv = torch_models.torchvision_models()
    if tv is None:
        print("torchvision is not installed (or does not import): only pwcpu.torch_models' MobileNetV2 and ResNet-50")
    else:
        builders.update({name: (lambda name=name: getattr(tv, name)(weights=None)) for name in TORCHVISION_MODELS})
    return builders


def _onnx_export(model, x) -> Optional[bytes]:
    """The model exported to ONNX (TorchScript exporter), or None without ONNX Runtime to run it
    or where the exporter cannot take the model."""
    import io

    import torch

    if importlib.util.find_spec("onnxruntime") is None:
        return None

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    except Exception as e:  # noqa: BLE001 - a model the exporter cannot take is reported, not fatal
        print(f"  ONNX export failed ({type(e).__name__}: {str(e)[:120]}): no ONNX Runtime time for this model")
        return None
    return buffer.getvalue()


def _onnxruntime_runner(onnx_model: bytes, x, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.contiguous().numpy()}
    return lambda: session.run(None, feed)[0]


# Keras' definitions of torchvision's networks, for TFLite (ResNet50 is v1, with the stride in the
# first 1x1 layer of a block where torchvision's v1.5 has it in the 3x3: the same FLOPs within 3 %).
KERAS_MODELS = {"mobilenet_v2": "MobileNetV2", "mobilenet_v3_large": "MobileNetV3Large",
                "efficientnet_b0": "EfficientNetB0", "resnet50": "ResNet50"}


def _tflite_model(name: str) -> Optional[bytes]:
    """Keras' definition of the same network (random weights, 224x224x3 input) converted to
    TFLite, or None without TensorFlow or a Keras counterpart. ``name`` is a torchvision name,
    possibly followed by where the model came from ("mobilenet_v2 (pwcpu.torch_models)")."""
    keras_name = KERAS_MODELS.get(name.split(" ")[0])
    if keras_name is None or importlib.util.find_spec("tensorflow") is None:
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    model = getattr(tf.keras.applications, keras_name)(weights=None, input_shape=(224, 224, 3))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the converter's notes
        warnings.simplefilter("ignore")
        return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def bench_models(threads_list: Sequence[int], min_seconds: float, rounds: int, pause: float,
                 only: Sequence[str] = ()) -> List[Dict]:
    """End-to-end, batch 1, 224x224 channels_last input: PyTorch (the model in channels_last), its
    pwcpu.torch.convert copy made from the model as it is and from the channels_last model (and the
    first on a plain NCHW input), ONNX Runtime on the exported model and TFLite (XNNPACK) on Keras'
    definition of the same network. Implementations alternate in rounds. ``only``: the models whose
    names contain one of these."""
    import torch

    from . import torch as pwcpu_torch
    from . import torch_models

    results = []
    for name, build in _model_builders().items():
        if only and not any(part in name for part in only):
            continue
        model = torch_models.randomize_batchnorm(build())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pwcpu_torch.PwcpuConversionWarning)
            converted = pwcpu_torch.convert(model)
            model = model.to(memory_format=torch.channels_last)
            converted_cl = pwcpu_torch.convert(model)
        layers = sum(isinstance(m, (pwcpu_torch.PwcpuConv2d, pwcpu_torch.PwcpuLinear)) for m in converted.modules())
        depthwise = sum(isinstance(m, pwcpu_torch.PwcpuDepthwiseConv2d) for m in converted.modules())
        dense = sum(isinstance(m, pwcpu_torch.PwcpuDenseConv2d) for m in converted.modules())
        x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)

        def runner(m, x=x):
            def run():
                with torch.inference_mode():
                    return m(x)
            return run

        # The converted model also on a plain NCHW tensor, what most PyTorch code passes (its first
        # layer reads an NHWC copy).
        runners = {"pytorch": runner(model), "converted": runner(converted), "converted (channels_last model)":
                   runner(converted_cl), "converted (NCHW input)": runner(converted, x.contiguous())}
        expected = runners["pytorch"]()
        tolerance = dict(rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
        torch.testing.assert_close(runners["converted"](), expected, **tolerance)
        torch.testing.assert_close(runners["converted (channels_last model)"](), expected, **tolerance)
        torch.testing.assert_close(runners["converted (NCHW input)"](), expected, **tolerance)
        onnx_model = _onnx_export(model, x)
        tflite_model = _tflite_model(name)
        for threads in threads_list:
            timed = dict(runners)
            ort_run = None if onnx_model is None else _onnxruntime_runner(onnx_model, x, threads)
            if ort_run is not None:
                np.testing.assert_allclose(ort_run(), expected.numpy(), rtol=1e-3, atol=tolerance["atol"])
                timed["onnxruntime"] = ort_run
            if tflite_model is not None:  # other weights: timed, not compared
                timed["tflite"] = _tflite_runner(tflite_model, np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), threads)
            with fixed_threads(threads):
                seconds = time_runners(timed, min_seconds, rounds, pause if threads > 1 else 0.0)
            base = seconds["pytorch"]
            results.append({"model": name, "threads": threads, "pwcpu_layers": layers, "pwcpu_depthwise_layers": depthwise,
                            "pwcpu_dense_layers": dense,
                            "ms": {k: v * 1e3 for k, v in seconds.items()},
                            "speedup": base / seconds["converted"],
                            "speedup_channels_last_model": base / seconds["converted (channels_last model)"],
                            "speedup_nchw_input": base / seconds["converted (NCHW input)"]})
            runtimes = [seconds[k] for k in ("onnxruntime", "tflite") if k in seconds]
            if runtimes:  # the slowest conversion against the faster runtime
                results[-1]["against_fastest_runtime"] = min(runtimes) / max(
                    seconds["converted"], seconds["converted (channels_last model)"], seconds["converted (NCHW input)"])
            line = "   ".join(f"{k} {v * 1e3:.2f} ms" + (f" ({base / v:.2f}x)" if k != "pytorch" else "")
                             for k, v in seconds.items())
            print(f"{name:<34} {layers:>3} 1x1 + {depthwise:>2} depthwise + {dense:>2} dense layers, {threads}T: {line}",
                  flush=True)
    for threads in threads_list:
        speedups = [min(r["speedup"], r["speedup_channels_last_model"]) for r in results if r["threads"] == threads]
        if speedups:
            geomean = _geomean(speedups)
            print(f"{threads} thread(s): converted against PyTorch (the lower of the two conversions): "
                  f"geometric mean {geomean:.2f}x, lowest {min(speedups):.2f}x over {len(speedups)} models")
        against = {r["model"]: r["against_fastest_runtime"] for r in results
                   if r["threads"] == threads and "against_fastest_runtime" in r}
        if against:
            print(f"{threads} thread(s): converted against the faster of ONNX Runtime and TFLite: "
                  + ", ".join(f"{name} {v:.2f}x" for name, v in against.items()))
    return results


# Depthwise layers of MobileNetV2 and EfficientNet-B0 at 224x224: (network, H = W, C, kernel, stride).
DEPTHWISE_LAYERS = [
    ("mobilenetv2", 112, 32, 3, 1), ("mobilenetv2", 112, 96, 3, 2), ("mobilenetv2", 56, 144, 3, 1),
    ("mobilenetv2", 56, 144, 3, 2), ("mobilenetv2", 28, 192, 3, 1), ("mobilenetv2", 28, 192, 3, 2),
    ("mobilenetv2", 14, 384, 3, 1), ("mobilenetv2", 14, 576, 3, 1), ("mobilenetv2", 14, 576, 3, 2),
    ("mobilenetv2", 7, 960, 3, 1),
    ("efficientnet_b0", 56, 144, 5, 2), ("efficientnet_b0", 28, 240, 5, 1), ("efficientnet_b0", 28, 240, 3, 2),
    ("efficientnet_b0", 14, 480, 3, 1), ("efficientnet_b0", 14, 480, 5, 1), ("efficientnet_b0", 14, 672, 5, 1),
    ("efficientnet_b0", 14, 672, 5, 2), ("efficientnet_b0", 7, 1152, 5, 1), ("efficientnet_b0", 7, 1152, 3, 1),
]


# Dense layers: the stems of MobileNetV2 / EfficientNet and ResNet-50, and ResNet-50's 3x3 layers
# (torchvision's v1.5: stride 2 in the 3x3): (network, H = W, C, K, kernel, stride).
DENSE_LAYERS = [
    ("mobilenetv2 stem", 224, 3, 32, 3, 2), ("resnet50 stem", 224, 3, 64, 7, 2),
    ("resnet50", 56, 64, 64, 3, 1), ("resnet50", 56, 128, 128, 3, 2), ("resnet50", 28, 128, 128, 3, 1),
    ("resnet50", 28, 256, 256, 3, 2), ("resnet50", 14, 256, 256, 3, 1), ("resnet50", 14, 512, 512, 3, 2),
    ("resnet50", 7, 512, 512, 3, 1),
]


def _window_runners(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int, threads: int,
                    peers: Sequence[str]) -> Dict[str, Runner]:
    """pwcpu and each available peer on NHWC x with zero padding: a dense convolution for weight
    (K, C, k, k), a depthwise one for (C, k, k)."""
    from . import DenseConv, DepthwiseConv

    dense = w.ndim == 4
    c, k_out, k = x.shape[3], w.shape[0], w.shape[-1]
    groups = 1 if dense else c
    w_oihw = w if dense else w[:, None]  # PyTorch's and ONNX's (K, C / groups, k, k)
    layer = (DenseConv if dense else DepthwiseConv)(w, b, stride=stride, padding=pad)
    out = layer(x)
    runners: Dict[str, Runner] = {"pwcpu": lambda: layer(x, out=out)}
    if "torch.conv2d" in peers:
        import torch
        import torch.nn.functional as F

        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        wt = torch.from_numpy(w_oihw).contiguous(memory_format=torch.channels_last)
        bt = torch.from_numpy(b)

        def torch_run():
            with torch.inference_mode():
                return F.conv2d(xt, wt, bt, stride, pad, 1, groups).permute(0, 2, 3, 1)
        runners["torch.conv2d"] = torch_run
    if "onnxruntime" in peers:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        ho = (x.shape[1] + 2 * pad - k) // stride + 1
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k], strides=[stride] * 2,
                                pads=[pad] * 4, group=groups)
        graph = helper.make_graph(
            [node], "convolution", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, x.shape[1], x.shape[2]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k_out, ho, ho])],
            initializer=[numpy_helper.from_array(np.ascontiguousarray(w_oihw), "w"), numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = min(model.ir_version, 9)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        runners["onnxruntime"] = lambda: session.run(None, {"x": x_nchw})[0].transpose(0, 2, 3, 1)
    if "tflite" in peers:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        filters = tf.constant(np.ascontiguousarray(w_oihw.transpose(2, 3, 1, 0)))  # (k, k, C / groups, K)
        if not dense:
            filters = tf.transpose(filters, [0, 1, 3, 2])  # depthwise: (k, k, C, 1)
        bias = tf.constant(b)
        paddings = [[0, 0], [pad, pad], [pad, pad], [0, 0]]

        @tf.function(input_signature=[tf.TensorSpec(x.shape, tf.float32)])
        def convolution(v):
            if dense:
                return tf.nn.conv2d(v, filters, [1, stride, stride, 1], padding=paddings) + bias
            return tf.nn.depthwise_conv2d(v, filters, [1, stride, stride, 1], padding=paddings) + bias

        converter = tf.lite.TFLiteConverter.from_concrete_functions([convolution.get_concrete_function()], convolution)
        runners["tflite"] = _tflite_runner(converter.convert(), x, threads)
    return runners


def bench_windows(dense: bool, threads_list: Sequence[int], peers: Sequence[str], min_seconds: float, rounds: int,
                  pause: float) -> List[Dict]:
    """Depthwise layers (MobileNetV2's and EfficientNet-B0's) or dense ones (stems, ResNet-50's 3x3),
    bias and no activation (what every peer fuses alike): pwcpu against PyTorch's conv2d on
    channels_last, ONNX Runtime's Conv and TFLite (XNNPACK); each checked against the float64
    reference, then timed alternating in rounds."""
    peers = [p for p in peers if p in ("torch.conv2d", "onnxruntime", "tflite")]
    rng = np.random.default_rng(0)
    kind = "dense" if dense else "depthwise"
    layers = DENSE_LAYERS if dense else [(net, hw, c, c, k, s) for net, hw, c, k, s in DEPTHWISE_LAYERS]
    results = []
    for threads in threads_list:
        print(f"\n{threads} thread(s): {kind} layers, microseconds per call (pwcpu's speedup over each peer)")
        speedups = []
        with fixed_threads(threads):
            for network, hw, c, k_out, k, stride in layers:
                x = rng.standard_normal((1, hw, hw, c)).astype(np.float32)
                shape = (k_out, c, k, k) if dense else (c, k, k)
                w = (rng.standard_normal(shape) / (k * math.sqrt(c if dense else 1))).astype(np.float32)
                b = rng.standard_normal(k_out).astype(np.float32)
                pad = k // 2
                runners = _window_runners(x, w, b, stride, pad, threads, peers)
                expected = (reference.conv2d if dense else reference.depthwise_conv2d)(x, w, b, stride=stride, padding=pad)
                for name, run in runners.items():
                    np.testing.assert_allclose(np.asarray(run()), expected, rtol=1e-4, atol=1e-4, err_msg=name)
                seconds = time_runners(runners, min_seconds, rounds, pause if threads > 1 else 0.0)
                label = f"{network} {hw}x{hw}x{c}" + (f"->{k_out}" if dense else "") + f" {k}x{k}/{stride}"
                others = {n: t for n, t in seconds.items() if n != "pwcpu"}
                best = min(others.values()) if others else None
                if best is not None:
                    speedups.append(best / seconds["pwcpu"])
                results.append({"layer": label, "threads": threads, "us": {n: t * 1e6 for n, t in seconds.items()},
                                "ratio_to_fastest_peer": None if best is None else best / seconds["pwcpu"]})
                line = "   ".join(f"{n} {t * 1e6:8.1f}" + (f" ({t / seconds['pwcpu']:.2f}x)" if n != "pwcpu" else "")
                                  for n, t in seconds.items())
                print(f"{label:<40} {line}", flush=True)
        if speedups:
            geomean = _geomean(speedups)
            print(f"{threads} thread(s): pwcpu over the fastest peer: geometric mean {geomean:.2f}x, "
                  f"lowest {min(speedups):.2f}x, {sum(v >= 1 for v in speedups)} of {len(speedups)} layers at or above")
    return results


def bench_overhead(threads_list: Sequence[int], min_seconds: float, rounds: int) -> List[Dict]:
    """The PyTorch bridge's cost per call: a converted layer called eagerly on a channels_last
    tensor against PointwiseConv called from NumPy on the same memory, and PyTorch's own conv."""
    import torch

    from . import torch as pwcpu_torch

    shapes = [(64, 16, 1), (16, 64, 1), (960, 240, 1), (32, 16, 7), (576, 96, 14), (24, 144, 56)]
    results = []
    for threads in threads_list:
        print(f"\n{threads} thread(s): microseconds per call")
        with fixed_threads(threads):
            for c, k, hw in shapes:
                conv = torch.nn.Conv2d(c, k, 1).eval()
                module = pwcpu_torch.PwcpuConv2d.from_modules(conv)
                layer = PointwiseConv(conv.weight.detach().numpy(), conv.bias.detach().numpy())
                x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
                x_nhwc = x.permute(0, 2, 3, 1).numpy()

                runners = {"numpy": lambda layer=layer, x=x_nhwc: layer(x), "converted": lambda m=module, x=x: m(x),
                           "torch": lambda m=conv, x=x: m(x)}
                with torch.inference_mode():  # entered once: its own cost is not the bridge's
                    seconds = time_runners(runners, min_seconds, rounds, 0.0)
                us = {name: v * 1e6 for name, v in seconds.items()}
                results.append({"layer": f"{c}->{k} {hw}x{hw}", "threads": threads, "us": us,
                                "overhead_us": us["converted"] - us["numpy"]})
                print(f"{c:>4} -> {k:<4} {hw:>2}x{hw:<2}  PointwiseConv from NumPy {us['numpy']:8.1f}   converted "
                      f"layer {us['converted']:8.1f} (+{us['converted'] - us['numpy']:.1f})   PyTorch conv "
                      f"{us['torch']:8.1f}", flush=True)
    return results


def bench_epilogue(layers: Sequence[Layer], threads_list: Sequence[int], min_seconds: float, rounds: int) -> List[Dict]:
    """A layer with bias + relu + residual (out is residual) against the plain layer (out=y): the
    fused epilogue's extra cost, weights packed beforehand in both."""
    results = []
    for threads in threads_list:
        print(f"\n{threads} thread(s): time of the fused epilogue relative to the plain convolution")
        with fixed_threads(threads):
            for layer in layers:
                d = LayerData.random(layer)
                ho, wo = layer.out_hw
                y = np.empty((layer.n, ho, wo, layer.k), np.float32)
                r = np.random.default_rng(1).standard_normal(y.shape, dtype=np.float32)
                s = layer.stride
                plain_layer = PointwiseConv(d.weight, stride=s)
                fused_layer = PointwiseConv(d.weight, d.bias, stride=s, activation="relu")
                runners = {
                    "plain": lambda plain=plain_layer, x=d.x, y=y: plain(x, out=y),
                    "fused": lambda fused=fused_layer, x=d.x, r=r: fused(x, residual=r, out=r),
                }
                seconds = time_runners(runners, min_seconds, rounds, 0.0)
                extra = seconds["fused"] / seconds["plain"] - 1
                results.append({"layer": layer.label, "threads": threads, "extra": extra})
                print(f"{layer.label:<36} plain {seconds['plain'] * 1e6:9.1f} us   fused {seconds['fused'] * 1e6:9.1f} us"
                      f"   {100 * extra:+6.1f}%", flush=True)
        extras = [r["extra"] for r in results if r["threads"] == threads]
        print(f"median {100 * statistics.median(extras):+.1f}%, largest {100 * max(extras):+.1f}%; "
              f"within 5%: {sum(e <= 0.05 for e in extras)} of {len(extras)} layers")
    return results


def _static_int8_layer(d: LayerData):
    """d's layer quantized statically (uint8 activations with a per-tensor scale and zero point,
    int8 weights per output channel, int32 bias, uint8 output): pwcpu's QuantizedPointwiseConv
    and the arguments of ONNX QLinearConv."""
    from ._quantized import QuantizedPointwiseConv

    low, high = min(float(d.x.min()), 0.0), max(float(d.x.max()), 0.0)
    x_scale = (high - low) / 255 or 1.0
    x_zero = np.uint8(round(-low / x_scale))
    xq = np.clip(np.rint(d.x / x_scale) + int(x_zero), 0, 255).astype(np.uint8)
    w_scale = (np.abs(d.weight).max(axis=1) / 127).astype(np.float32)
    w_scale[w_scale == 0] = 1.0
    wq = np.clip(np.rint(d.weight / w_scale[:, None]), -127, 127).astype(np.int8)
    bias = np.rint(d.bias / (x_scale * w_scale)).astype(np.int32)
    y = d.reference()
    y_scale = (float(y.max()) - float(y.min())) / 255 or 1.0
    y_zero = np.uint8(np.clip(round(-float(y.min()) / y_scale), 0, 255))
    args = dict(w_scale=w_scale, w_zero_point=0, x_scale=x_scale, x_zero_point=x_zero, y_scale=y_scale,
                y_zero_point=y_zero, bias=bias)
    s = d.layer.stride
    return QuantizedPointwiseConv(wq, stride=s, **args), xq, wq, args


def _onnxruntime_qlinear_runner(xq, wq, args, stride: int, threads: int):
    """ONNX Runtime's QLinearConv (MLAS) on the same quantized layer, NCHW as ONNX has it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = wq.shape[0]
    values = {"xs": np.array(args["x_scale"], np.float32), "xz": np.array(args["x_zero_point"]),
              "w": wq.reshape(k, -1, 1, 1), "ws": args["w_scale"], "wz": np.zeros(k, np.int8),
              "ys": np.array(args["y_scale"], np.float32), "yz": np.array(args["y_zero_point"]), "b": args["bias"]}
    node = helper.make_node("QLinearConv", ["x", *values], ["y"], kernel_shape=[1, 1], strides=[stride, stride])
    graph = helper.make_graph([node], "qlinear_conv1x1", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(v, n) for n, v in values.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.ascontiguousarray(xq.transpose(0, 3, 1, 2))}
    return lambda: session.run(None, feed)[0]


def _torch_quantized_conv_runner(xq, wq, args, stride: int):
    """PyTorch's quantized Conv2d (x86 engine: FBGEMM / oneDNN) on the same quantized layer,
    channels_last; its float bias is the int32 bias in real units."""
    import torch
    from torch.ao.nn.quantized import Conv2d

    torch.backends.quantized.engine = "x86"
    k, c = wq.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch 2.13 marks its quantized tensors deprecated
        conv = Conv2d(c, k, 1, stride=stride)
        w_scale = torch.from_numpy(args["w_scale"]).double()
        weight = torch._make_per_channel_quantized_tensor(torch.from_numpy(wq.reshape(k, c, 1, 1)), w_scale,
                                                           torch.zeros(k, dtype=torch.int64), 0)
        conv.set_weight_bias(weight, torch.from_numpy(args["bias"] * (args["x_scale"] * args["w_scale"])).float())
        conv.scale, conv.zero_point = float(args["y_scale"]), int(args["y_zero_point"])
        x = torch.from_numpy(xq).permute(0, 3, 1, 2)  # channels_last memory, NCHW shape
        qx = torch._make_per_tensor_quantized_tensor(x, float(args["x_scale"]), int(args["x_zero_point"]))

    def run():
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return conv(qx)

    return run


def bench_precision(layers: Sequence[Layer], threads_list: Sequence[int], precision: str, min_seconds: float,
                    rounds: int, pause: float) -> List[Dict]:
    """pwcpu at ``precision`` against pwcpu's fp32 on the same layer (float32 arrays in and out, weights
    packed beforehand), and for bf16 against PyTorch's conv2d on bf16 tensors (channels_last, oneDNN)
    where PyTorch is installed, pwcpu bf16 also on bfloat16 arrays in and out (ml_dtypes) as PyTorch
    takes them. int8 rows carry the relative RMS error against the exact float32
    result, and that of the same quantization computed exactly (float64), as a ratio; and the static
    int8 layer (qlinear_conv1x1: uint8 in and out) against ONNX Runtime's QLinearConv, PyTorch's
    quantized Conv2d and TFLite's int8 conv, each where installed."""
    torch = None
    if precision == "bf16" and importlib.util.find_spec("torch") is not None:
        import torch
    bfloat16 = None
    if precision == "bf16" and importlib.util.find_spec("ml_dtypes") is not None:
        from ml_dtypes import bfloat16
    with_ort = precision == "int8" and all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    with_torch_int8 = precision == "int8" and importlib.util.find_spec("torch") is not None
    with_tflite_int8 = precision == "int8" and importlib.util.find_spec("tensorflow") is not None
    results = []
    for threads in threads_list:
        print(f"\n{threads} thread(s): GFLOP/s of pwcpu {precision} and fp32"
              + (f", PyTorch conv2d {precision} (channels_last)" if torch is not None else ""))
        with fixed_threads(threads):
            for layer in layers:
                d = LayerData.random(layer)
                s = layer.stride
                fast, exact = (PointwiseConv(d.weight, d.bias, stride=s, precision=p) for p in (precision, "fp32"))
                y, y32 = fast(d.x), exact(d.x)
                check_result(f"pwcpu {precision}", y, d, precision)
                runners = {precision: lambda: fast(d.x, out=y), "fp32": lambda: exact(d.x, out=y32)}
                if precision == "bf16" and bfloat16 is not None:
                    # bfloat16 arrays in and out, as PyTorch's bf16 conv2d takes and gives tensors.
                    xb, yb = d.x.astype(bfloat16), np.empty(y.shape, bfloat16)
                    runners["bf16_io"] = lambda: fast(xb, out=yb)
                if precision == "int8":
                    static, xq, wq, args = _static_int8_layer(d)
                    yq = static(xq)
                    runners["qlinear"] = lambda: static(xq, out=yq)
                    if with_ort:
                        runners["ort_qlinear"] = _onnxruntime_qlinear_runner(xq, wq, args, s, threads)
                    if with_torch_int8:
                        runners["torch_qconv"] = _torch_quantized_conv_runner(xq, wq, args, s)
                    if with_tflite_int8:
                        runners["tflite_int8"] = make_tflite(d, threads, int8=True)
                if torch is not None:
                    dtype = {"bf16": torch.bfloat16}[precision]
                    tx = torch.from_numpy(d.x).permute(0, 3, 1, 2).to(dtype)  # keeps channels_last memory
                    tw = torch.from_numpy(d.weight)[:, :, None, None].to(dtype).contiguous(memory_format=torch.channels_last)
                    tb = torch.from_numpy(d.bias).to(dtype)

                    def torch_run(tx=tx, tw=tw, tb=tb):
                        with torch.inference_mode():
                            return torch.nn.functional.conv2d(tx, tw, tb, stride=s)

                    runners["torch"] = torch_run
                seconds = time_runners(runners, min_seconds, rounds, pause if threads > 1 else 0.0)
                gflops = {n: layer.flops / t / 1e9 for n, t in seconds.items()}
                row = {"layer": layer.label, "threads": threads, "gflops": gflops,
                       "over_fp32": gflops[precision] / gflops["fp32"]}
                if "torch" in gflops:
                    row["over_torch"] = gflops[precision] / gflops["torch"]
                    if "bf16_io" in gflops:
                        row["bf16_io_over_torch"] = gflops["bf16_io"] / gflops["torch"]
                if "ort_qlinear" in gflops:
                    row["qlinear_over_ort"] = gflops["qlinear"] / gflops["ort_qlinear"]
                if "torch_qconv" in gflops:
                    row["qlinear_over_torch"] = gflops["qlinear"] / gflops["torch_qconv"]
                if "tflite_int8" in gflops:
                    row["qlinear_over_tflite"] = gflops["qlinear"] / gflops["tflite_int8"]
                if precision == "int8":
                    exact_y = d.reference()
                    row["rms_error"] = _relative_rms(y, exact_y)
                    row["rms_error_over_exact_scheme"] = row["rms_error"] / _relative_rms(d.reference("int8"), exact_y)
                results.append(row)
                line = "   ".join(f"{n} {g:6.1f}" for n, g in gflops.items())
                torch_ratio = f"   {row['over_torch']:.2f}x PyTorch" if "over_torch" in row else ""
                if "bf16_io_over_torch" in row:
                    torch_ratio += f" (bfloat16 arrays {row['bf16_io_over_torch']:.2f}x)"
                if "rms_error" in row:
                    torch_ratio += (f"   RMS error {100 * row['rms_error']:.2f} % "
                                    f"({row['rms_error_over_exact_scheme']:.3f}x the scheme's, computed exactly)")
                if "qlinear_over_ort" in row:
                    torch_ratio += f"   qlinear {row['qlinear_over_ort']:.2f}x ONNX Runtime"
                if "qlinear_over_torch" in row:
                    torch_ratio += f", {row['qlinear_over_torch']:.2f}x PyTorch"
                if "qlinear_over_tflite" in row:
                    torch_ratio += f", {row['qlinear_over_tflite']:.2f}x TFLite"
                print(f"{layer.label:<36} {line}   {precision} {row['over_fp32']:.2f}x fp32{torch_ratio}", flush=True)
        rows = [r for r in results if r["threads"] == threads]
        print(f"geometric mean {precision} over fp32: {_geomean([r['over_fp32'] for r in rows]):.2f}x"
              + (f", over PyTorch {precision}: {_geomean([r['over_torch'] for r in rows]):.2f}x"
                 if torch is not None else "")
              + (f" (bfloat16 arrays in and out: {_geomean([r['bf16_io_over_torch'] for r in rows]):.2f}x)"
                 if torch is not None and bfloat16 is not None else "")
              + (f", static int8 over ONNX Runtime QLinearConv: {_geomean([r['qlinear_over_ort'] for r in rows]):.2f}x"
                 if with_ort else "")
              + (f", over PyTorch's quantized Conv2d: {_geomean([r['qlinear_over_torch'] for r in rows]):.2f}x"
                 if with_torch_int8 else "")
              + (f", over TFLite int8: {_geomean([r['qlinear_over_tflite'] for r in rows]):.2f}x"
                 if with_tflite_int8 else ""))
    return results


# (name, C, K, bias, activation): a hyperspectral-like stack (narrow output: the GEMM dominates) and
# a feature map (wide output: NumPy's separate passes over it dominate).
DASK_LAYERS = [("hyperspectral stack", 224, 32, False, "relu"), ("feature map", 64, 256, True, "silu")]


def _numpy_layer(block: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], activation: str) -> np.ndarray:
    """The NumPy alternative per Dask block: ``x @ weight.T`` + bias + activation."""
    y = block @ weight.T
    if bias is not None:
        y = y + bias
    return np.maximum(y, np.float32(0)) if activation == "relu" else y / (1 + np.exp(-y))  # relu or silu


def _cluster_cpu_seconds() -> Tuple[float, float]:
    """CPU seconds used so far by this process's children (a LocalCluster's workers and nannies)
    and by this process (the client, and the LocalCluster's scheduler)."""
    import psutil  # a dependency of distributed

    me = psutil.Process()
    workers = 0.0
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # gone since listed
            continue
        workers += times.user + times.system
    own = me.cpu_times()
    return workers, own.user + own.system


def bench_dask(gib: float, rounds: int) -> List[Dict]:
    """Throughput (GB/s of input) of pwcpu.dask against NumPy's ``x @ w.T`` + bias + activation per
    block (map_blocks) on float32 arrays of ``gib`` GiB persisted on a LocalCluster of 2 single-threaded worker
    processes, and pwcpu's on a cluster of 1: each result persisted (computed and kept on the
    workers), then released; implementations alternate in rounds, the median kept. Each row also
    gives the cores the workers and the scheduler kept busy (CPU seconds per second): on a machine
    of 2 cores the scheduler's share is taken from the 2 workers, not from a spare core as with 1."""
    import dask.array as da
    from dask.graph_manipulation import clone
    from distributed import Client, LocalCluster, wait

    from . import dask as pwcpu_dask

    results = []
    for workers in (2, 1):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=50) as cluster, Client(cluster) as client:
            for name, c, k, with_bias, activation in DASK_LAYERS:
                width = 1024
                rows = max(1, int(gib * 2**30 / 4 / c / width))
                # 64 MiB of input per chunk (Dask's default chunk size is 128 MiB): tasks of 30-200 ms.
                # With 32 MiB the stack's tasks (10-15 ms) each waited on the scheduler for the next,
                # which on 2 cores shares them with the workers (2 workers 1.46-1.61x 1 on Zen 3 and 4).
                chunk_rows = max(1, 64 * 2**20 // (4 * c * width))
                rng = np.random.default_rng(0)
                weight = (rng.standard_normal((k, c)) / math.sqrt(c)).astype(np.float32)
                bias = rng.standard_normal(k).astype(np.float32) if with_bias else None
                x = da.random.default_rng(0).standard_normal((1, rows, width, c), chunks=(1, chunk_rows, width, c),
                                                             dtype=np.float32)
                x = client.persist(x)
                wait(x)
                # Keys of their own each round, so that nothing is reused from the round before.
                graphs = {"pwcpu": lambda: clone(pwcpu_dask.conv1x1(x, weight, bias, activation=activation), omit=x)}
                if workers == 2:
                    graphs["numpy"] = lambda: x.map_blocks(_numpy_layer, weight, bias, activation, dtype=np.float32,
                                                           chunks=x.chunks[:3] + ((k,),),
                                                           name=f"numpy-layer-{time.perf_counter_ns()}")
                seconds: Dict[str, List[float]] = {n: [] for n in graphs}
                # CPU seconds per second of each round: the computing workers' (with their nannies)
                # and this process's, where the LocalCluster's scheduler runs.
                busy: Dict[str, List[Tuple[float, float]]] = {n: [] for n in graphs}
                for graph in graphs.values():  # warm-up: workers fetch the layer and import what they need
                    wait(client.persist(graph()))
                for _ in range(rounds):
                    for impl, graph in graphs.items():
                        y = graph()
                        cpu_before = _cluster_cpu_seconds()
                        start = time.perf_counter()
                        y = client.persist(y)
                        wait(y)
                        wall = time.perf_counter() - start
                        cpu_after = _cluster_cpu_seconds()
                        seconds[impl].append(wall)
                        busy[impl].append(tuple((b - a) / wall for a, b in zip(cpu_before, cpu_after)))
                        del y
                gbytes = x.nbytes / 1e9
                row = {"layer": name, "workers": workers, "input_gb": gbytes, "shape": list(x.shape),
                       "chunks": [int(v[0]) for v in x.chunks],
                       "gb_per_s": {impl: gbytes / statistics.median(t) for impl, t in seconds.items()},
                       "cores_busy": {impl: {"workers": statistics.median(b[0] for b in v),
                                             "scheduler_and_client": statistics.median(b[1] for b in v)}
                                      for impl, v in busy.items()},
                       "cores": len(os.sched_getaffinity(0))}
                results.append(row)
                line = "   ".join(f"{impl} {v:.2f} GB/s" for impl, v in row["gb_per_s"].items())
                cores = row["cores_busy"]["pwcpu"]
                print(f"{name:<20} {c:>4} -> {k:<4} {gbytes:.2f} GB on {workers} worker(s): {line}   (pwcpu: workers "
                      f"kept {cores['workers']:.2f} cores busy, scheduler and client {cores['scheduler_and_client']:.2f}, "
                      f"of {row['cores']})", flush=True)
                del x
    for name, *_ in DASK_LAYERS:
        two = next(r["gb_per_s"] for r in results if r["layer"] == name and r["workers"] == 2)
        one = next(r["gb_per_s"]["pwcpu"] for r in results if r["layer"] == name and r["workers"] == 1)
        row = next(r for r in results if r["layer"] == name and r["workers"] == 2)
        used = sum(row["cores_busy"]["pwcpu"].values())
        print(f"{name}: pwcpu {two['pwcpu'] / two['numpy']:.2f}x NumPy's x @ w.T + bias + activation per block; "
              f"2 workers {two['pwcpu'] / one:.2f}x 1 worker, with {used:.2f} of {row['cores']} cores busy")
    return results


def run(args: argparse.Namespace) -> int:
    if args.isa and os.environ.get(_ISA_APPLIED) != args.isa:
        return _rerun_with_isa(args.isa)
    info = runtime_info()
    if args.isa:
        info["peer_isa_limits"] = ISA_PEER_LIMITS[args.isa]
    threads_list = [int(t) for t in args.threads.split(",")] if args.threads else [info["threads"]]
    if args.precision != "fp32":
        family = info[f"{args.precision}_isa"]
        print(f"pwcpu {info['version']}: ISA {info['isa']}, {args.precision} kernels {family} "
              f"({', '.join(info[f'{args.precision}_gemm_kernels'])}); {info.get('cpu_model', '')}")
        results = bench_precision(SUITES[args.suite], threads_list, args.precision, args.seconds, args.rounds,
                                  args.pause)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runtime": info, "precision": args.precision, "results": results}, f, indent=1)
        return 0
    if args.epilogue:
        results = bench_epilogue(SUITES[args.suite], threads_list, args.seconds, args.rounds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runtime": info, "epilogue": results}, f, indent=1)
        return 0
    if args.depthwise or args.dense:
        kernel = info["kernel_main"] if args.dense else info["kernel_depthwise"]
        print(f"pwcpu {info['version']}: ISA {info['isa']}, kernel {kernel}; {info.get('cpu_model', '')}")
        requested = list(PEERS) if args.peers == "all" else [] if args.peers == "none" else args.peers.split(",")
        peers, missing = available_peers([p for p in requested if p in PEERS])
        for name, note in missing.items():
            print(f"skipped {name}: {note}")
        results = bench_windows(args.dense, threads_list, peers, args.seconds, args.rounds, args.pause)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runtime": info, "dense" if args.dense else "depthwise": results}, f, indent=1)
        return 0
    if args.dask:
        print(f"pwcpu {info['version']}: ISA {info['isa']}; {info.get('cpu_model', '')}")
        results = bench_dask(args.dask_gib, args.rounds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runtime": info, "dask": results}, f, indent=1)
        return 0
    if args.models or args.overhead:
        print(f"pwcpu {info['version']}: ISA {info['isa']}; {info.get('cpu_model', '')}")
        key = "models" if args.models else "overhead"
        results = (bench_models(threads_list, max(args.seconds, 0.5), args.rounds, args.pause,
                                [m for m in args.model.split(",") if m]) if args.models
                   else bench_overhead(threads_list, args.seconds, args.rounds))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runtime": info, key: results}, f, indent=1)
        return 0
    requested = list(PEERS) if args.peers == "all" else [] if args.peers == "none" else args.peers.split(",")
    unknown = [p for p in requested if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    # The peak first: importing the peers (TensorFlow above all) starts threads that stay busy for
    # a while and once halved a 2-thread measurement.
    peaks = {t: _core.measure_fma_peak_gflops(t, 0.3) for t in threads_list}
    peers, missing = available_peers(requested)
    layers = SUITES[args.suite]

    print(f"pwcpu {info['version']} on {info['cpu_model']}: ISA {info['isa']}, kernels {', '.join(info['gemm_kernels'])}"
          f"; L1d {info['l1d_bytes'] // 1024} KiB, L2 {info['l2_bytes'] // 1024} KiB, "
          f"L3 {info['l3_bytes'] // 1024} KiB")
    compared = list(peers)
    if args.isa:
        print("peers held by: " + " ".join(f"{k}={v}" for k, v in ISA_PEER_LIMITS[args.isa].items()))
        compared = [p for p in peers if p in ISA_HELD_PEERS[args.isa]]
        unheld = [p for p in peers if p not in compared]
        if unheld:
            print(f"not held to {args.isa} (no switch; shown, but outside 'vs best'): {', '.join(unheld)}")
    print(_openblas_note())
    for name, note in missing.items():
        print(f"skipped {name}: {note}")
    results = []
    for threads in threads_list:
        print(f"\n{threads} thread(s); {info['isa']} FMA peak {peaks[threads]:.0f} GFLOP/s")
        names = ["pwcpu"] + peers
        header = f"{'layer':<36}{'MFLOP':>8}" + "".join(f"{n:>14}" for n in names) + f"{'%peak':>7}{'vs best':>9}"
        print(header + "\n" + "-" * len(header))
        with fixed_threads(threads):
            for layer in layers:
                r = bench_layer(layer, peers, threads, args.seconds, args.rounds, args.pause, compared)
                r["peak_share"] = r["gflops"]["pwcpu"] / peaks[threads]
                results.append(r)
                row = f"{layer.label:<36}{r['mflop']:>8.1f}" + "".join(f"{r['gflops'][n]:>14.1f}" for n in names)
                ratio = f"{r['ratio']:>8.2f}x" if compared else ""
                print(row + f"{100 * r['peak_share']:>6.0f}%" + ratio, flush=True)
        if compared:
            ratios = [r["ratio"] for r in results if r["threads"] == threads]
            geomean = _geomean(ratios)
            print(f"GFLOP/s shown; geometric mean of pwcpu / fastest peer: {geomean:.2f}x, "
                  f"slowest layer {min(ratios):.2f}x")
    if 1 in threads_list and len(threads_list) > 1:
        single = {r["layer"]: r["gflops"]["pwcpu"] for r in results if r["threads"] == 1}
        for threads in threads_list:
            if threads == 1:
                continue
            speedups = [r["gflops"]["pwcpu"] / single[r["layer"]] for r in results
                        if r["threads"] == threads and r["mflop"] >= 50]
            if speedups:
                print(f"pwcpu {threads} threads against 1 on the {len(speedups)} layers of 50 MFLOP or more: "
                      f"lowest {min(speedups):.2f}x, median {statistics.median(speedups):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runtime": info, "peaks_gflops": peaks, "peers": peers, "compared_peers": compared,
                       "results": results}, f, indent=1)
    if args.plot:
        plot(results, peaks, args.plot)
    return 0


def plot(results: List[Dict], peaks: Dict[int, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thread_counts = sorted({r["threads"] for r in results})
    fig, axes = plt.subplots(len(thread_counts), 1, figsize=(18, 5 * len(thread_counts)), squeeze=False)
    for ax, threads in zip(axes[:, 0], thread_counts):
        rows = [r for r in results if r["threads"] == threads]
        names = list(rows[0]["gflops"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar(np.arange(len(rows)) + i * width, [r["gflops"][name] for r in rows], width, label=name)
        ax.axhline(peaks[threads], color="k", linestyle="--", linewidth=1, label="FMA peak")
        ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
        ax.set_xticklabels([r["layer"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"1x1 convolution, fp32, {threads} thread(s)")
        ax.legend(fontsize=8, ncol=len(names) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
