"""Threads, ISA selection and introspection."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

import pwcpu
from pwcpu import _core


def run_python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("PWCPU_ISA", "PWCPU_BF16_ISA", "PWCPU_INT8_ISA", "OMP_NUM_THREADS")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


def test_num_threads_context():
    # OpenMP's own count (the cap): OMP_NUM_THREADS, else the CPUs this process may run on.
    openmp = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0] or len(os.sched_getaffinity(0)))
    pwcpu.set_num_threads(2)
    assert pwcpu.get_num_threads() == min(2, openmp)
    with pwcpu.num_threads(1):
        assert pwcpu.get_num_threads() == 1
        with pwcpu.num_threads(3):  # nested: the inner count, capped like any other
            assert pwcpu.get_num_threads() == min(3, openmp)
        assert pwcpu.get_num_threads() == 1
    assert pwcpu.get_num_threads() == min(2, openmp)  # restored exactly, not merely bounded


def test_omp_num_threads_is_honoured():
    result = run_python("import pwcpu; print(pwcpu.get_num_threads())", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_threadpoolctl_controls_pwcpu():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pwcpu.set_num_threads(2)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert pwcpu.get_num_threads() == 1
        x = np.ones((1, 8, 8, 16), np.float32)
        assert pwcpu.conv1x1(x, np.ones((4, 16), np.float32)).shape == (1, 8, 8, 4)
    assert pwcpu.get_num_threads() == min(2, os.cpu_count())


@pytest.mark.parametrize("isa", _core.runtime_info()["supported_isas"])
def test_pwcpu_isa_override(isa):
    """PWCPU_ISA sets every family to that ISA's kernels, or where it has none of a family's (an
    extension such as avx512bf16 brings only bf16 kernels), to the next ISA down's."""
    code = "import pwcpu; i = pwcpu.runtime_info(); print(i['isa'], i['bf16_isa'], i['int8_isa'], '|', i['isa_reason'])"
    result = run_python(code, PWCPU_ISA=isa)
    assert result.returncode == 0, result.stderr
    families = result.stdout.split("|")[0].split()
    order = _core.runtime_info()["supported_isas"]
    assert isa in families and all(order.index(f) >= order.index(isa) for f in families)
    assert "requested by PWCPU_ISA" in result.stdout


@pytest.mark.parametrize("variable", ["PWCPU_ISA", "PWCPU_BF16_ISA", "PWCPU_INT8_ISA"])
@pytest.mark.parametrize("value,message", [("avx9000", "not a known ISA"), ("SCALAR", "not a known ISA")])
def test_bad_pwcpu_isa_fails_at_import(variable, value, message):
    result = run_python("import pwcpu", **{variable: value})
    assert result.returncode != 0
    assert message in result.stderr and variable in result.stderr


def test_each_family_has_its_own_override():
    """PWCPU_BF16_ISA and PWCPU_INT8_ISA choose those families' kernels alone (fp32 keeps the
    CPU's best); select_isa() then switches every family."""
    code = """
import numpy as np, pwcpu
from pwcpu import _core
weight = np.ones((8, 8), np.float32)
layers = {p: pwcpu.PointwiseConv(weight, precision=p) for p in ("fp32", "bf16", "int8")}
i = pwcpu.runtime_info()
print(i["isa"], i["bf16_isa"], i["int8_isa"], i["int8_isa_reason"].replace(" ", "_"), *(l.kernel for l in layers.values()))
y = layers["int8"](np.ones((1, 2, 2, 8), np.float32))
print(float(y.min()), float(y.max()))
_core.select_isa(i["isa"])
print(pwcpu.runtime_info()["bf16_isa"], pwcpu.runtime_info()["int8_isa"], pwcpu.PointwiseConv(weight, precision="int8").kernel)
"""
    best = run_python("import pwcpu; print(pwcpu.runtime_info()['isa'])").stdout.strip()  # fp32's
    result = run_python(code, PWCPU_BF16_ISA="scalar", PWCPU_INT8_ISA="scalar")
    assert result.returncode == 0, result.stderr
    first, values, after = result.stdout.splitlines()
    isa, bf16_isa, int8_isa, reason, fp32_kernel, bf16_kernel, int8_kernel = first.split()
    assert (isa, bf16_isa, int8_isa, reason) == (best, "scalar", "scalar", "requested_by_PWCPU_INT8_ISA")
    assert fp32_kernel.endswith("_" + best) and bf16_kernel.endswith("_scalar") and int8_kernel.endswith("_scalar")
    assert values.split() == ["8.0", "8.0"]
    bf16_after, int8_after, int8_kernel_after = after.split()
    assert bf16_after == best and int8_after != "scalar" and int8_kernel_after.endswith("_" + int8_after)


def test_kernels_chosen_by_speeds_timed_on_this_cpu():
    """By default the fp32 kernels' speeds are timed at first use (the tests run with the tables'
    figures): every listed kernel has a positive speed and is some width's choice, and a layer's
    results do not depend on which kernel computes it (every kernel sums in the same order)."""
    code = """
import sys, numpy as np, pwcpu
from pwcpu import _core
if sys.argv[1] != "auto": _core.select_isa(sys.argv[1])
i = pwcpu.runtime_info()
rng = np.random.default_rng(7)
chosen = set()
for k in range(1, 100):
    layer = pwcpu.PointwiseConv(rng.standard_normal((k, 37), dtype=np.float32), rng.standard_normal(k, dtype=np.float32))
    chosen.add(layer.kernel)
    y = layer(rng.standard_normal((1, 5, 7, 37), dtype=np.float32))
    sys.stdout.buffer.write(y.tobytes())
sys.stderr.write(repr((i["gemm_kernels"], i["gemm_kernel_speeds"], sorted(chosen))))
"""
    for isa in pwcpu.runtime_info()["supported_isas"]:
        timed = subprocess.run([sys.executable, "-c", code, isa], capture_output=True, env=dict(
            {k: v for k, v in os.environ.items() if k not in ("PWCPU_KERNEL_TIMING", "PWCPU_ISA")}), timeout=120)
        fixed = subprocess.run([sys.executable, "-c", code, isa], capture_output=True, env=dict(
            os.environ, PWCPU_KERNEL_TIMING="0"), timeout=120)
        assert timed.returncode == 0 and fixed.returncode == 0, timed.stderr + fixed.stderr
        kernels, speeds, chosen = ast.literal_eval(timed.stderr.decode())
        # Relative to the main kernel, and never above it (see dispatch.cpp).
        assert len(speeds) == len(kernels) and speeds[0] == 1.0 and all(0.0 < s <= 1.0 for s in speeds), speeds
        assert set(chosen) <= set(kernels) and set(kernels) - set(chosen) <= {kernels[0]}, (kernels, chosen)
        assert timed.stdout == fixed.stdout, isa


def test_runtime_info_and_show_runtime(capsys):
    info = pwcpu.runtime_info()
    assert info["isa"] in info["supported_isas"]
    assert "scalar" in info["supported_isas"]
    assert info["threads"] == pwcpu.get_num_threads()
    assert info["l1d_bytes"] > 0 and info["l2_bytes"] > 0
    assert info["version"] == pwcpu.__version__
    pwcpu.show_runtime()
    printed = capsys.readouterr().out
    assert f"ISA in use:     {info['isa']}" in printed and info["kernel_main"] in printed
    assert info["bf16_gemm_kernels"] and len(info["gemm_kernel_speeds"]) == len(info["gemm_kernels"])
    assert all(name in printed for name in info["bf16_gemm_kernels"])
    if info["bf16_isa"] == "avx512bf16":
        assert all(name.startswith("bf16_f32_dot_") for name in info["bf16_gemm_kernels"])
    elif info["bf16_isa"] == "avx512amx":
        assert all(name.startswith("bf16_f32_amx_") for name in info["bf16_gemm_kernels"])
    else:  # no bfloat16 instructions: the float32 kernels of that ISA run on rounded operands
        assert all(name.startswith("f32_gemm_") and name.endswith("_" + info["bf16_isa"])
                   for name in info["bf16_gemm_kernels"])
    assert info["int8_isa"] in info["supported_isas"] and info["int8_gemm_kernels"]
    assert all(name in printed and name.startswith("int8_f32_") for name in info["int8_gemm_kernels"])


def test_module_info_command():
    result = subprocess.run([sys.executable, "-m", "pwcpu", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ISA in use" in result.stdout and "threads" in result.stdout


def test_public_api():
    for name in pwcpu.__all__:
        assert hasattr(pwcpu, name), name
    assert callable(pwcpu.reference.conv1x1)


def test_num_threads_blocks_in_two_threads_restore_their_own_values():
    """Overlapping blocks in different threads, the first one in leaving first: each thread sees
    its own count, and the process count is what it was once both have left."""
    import threading

    pwcpu.set_num_threads(2)
    outer = pwcpu.get_num_threads()
    first_in, second_in, first_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def block(name):
        if name == "second":
            first_in.wait()
        with pwcpu.num_threads(1):
            if name == "first":
                first_in.set()
                second_in.wait()
            else:
                second_in.set()
            seen[name] = pwcpu.get_num_threads()
            if name == "second":
                first_left.wait()
        if name == "first":
            first_left.set()

    first = threading.Thread(target=block, args=("first",))
    first.start()
    second = threading.Thread(target=block, args=("second",))
    second.start()
    first.join()
    second.join()
    assert seen == {"first": 1, "second": 1}
    assert pwcpu.get_num_threads() == outer
    with pwcpu.num_threads(1):
        with pwcpu.num_threads(2):
            assert pwcpu.get_num_threads() == outer
        assert pwcpu.get_num_threads() == 1
    assert pwcpu.get_num_threads() == outer


def test_set_num_threads_leaves_torch_threads_alone():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    pwcpu.set_num_threads(1)
    assert pwcpu.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_absurd_thread_counts_are_capped_and_numpy_ints_accepted():
    import time

    pwcpu.set_num_threads(np.int64(1))
    assert pwcpu.get_num_threads() == 1
    pwcpu.set_num_threads(2**31 - 1)
    assert pwcpu.get_num_threads() <= os.cpu_count()
    x, w = np.ones((1, 56, 56, 64), np.float32), np.ones((64, 64), np.float32)
    pwcpu.conv1x1(x, w)
    start = time.perf_counter()
    pwcpu.conv1x1(x, w)
    assert time.perf_counter() - start < 0.5  # 4.2 s when the partitioning tried 2^31 threads
    with pwcpu.num_threads(10**6):
        assert pwcpu.get_num_threads() <= os.cpu_count()
