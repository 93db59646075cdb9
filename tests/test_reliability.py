"""Concurrency, fork safety, 64-bit sizes, allocation failure and memory use."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import pwcpu
from helpers import check_conv, randn


def run_script(tmp_path, code, timeout=120, env=None):
    # A file, not -c: spawned workers re-import the main module.
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    environment = None if env is None else {**os.environ, **env}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                          env=environment)


class TestConcurrency:
    def test_threads_get_the_serial_results(self, rng):
        layer = pwcpu.PointwiseConv(randn(rng, 96, 64), randn(rng, 96), activation="relu")
        weight = randn(rng, 40, 64)
        inputs = [randn(rng, 1, 9 + i, 11, 64) for i in range(8)]
        serial = [(layer(x), pwcpu.conv1x1(x, weight, stride=2)) for x in inputs]
        results = [None] * len(inputs)
        errors = []

        def work(i):
            try:
                for _ in range(20):
                    got = (layer(inputs[i]), pwcpu.conv1x1(inputs[i], weight, stride=2))
                    np.testing.assert_array_equal(got[0], serial[i][0])
                    np.testing.assert_array_equal(got[1], serial[i][1])
                results[i] = True
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert all(results)

    def test_gil_is_released_during_a_call(self, rng):
        """While one thread runs a long call, another keeps running Python code."""
        x, weight = randn(rng, 4, 56, 56, 256), randn(rng, 256, 256)
        layer = pwcpu.PointwiseConv(weight)
        done = threading.Event()
        calls = []

        def compute():
            with pwcpu.num_threads(1):
                while not done.is_set() or len(calls) < 2:
                    layer(x)
                    calls.append(1)

        worker = threading.Thread(target=compute)
        worker.start()
        progress = 0
        while len(calls) < 2:  # count Python iterations while the worker is inside the kernels
            progress += 1
        done.set()
        worker.join()
        # Each call takes tens of milliseconds; with the GIL held this loop would barely advance.
        assert progress > 10_000

    def test_changing_threads_does_not_disturb_running_calls(self, rng):
        x, weight, bias = randn(rng, 2, 28, 28, 128), randn(rng, 192, 128), randn(rng, 192)
        expected = pwcpu.conv1x1(x, weight, bias, activation="gelu")
        stop = threading.Event()

        def toggle():
            n = 1
            while not stop.is_set():
                pwcpu.set_num_threads(n)
                n = 3 - n

        toggler = threading.Thread(target=toggle)
        toggler.start()
        try:
            for _ in range(50):
                np.testing.assert_array_equal(pwcpu.conv1x1(x, weight, bias, activation="gelu"), expected)
        finally:
            stop.set()
            toggler.join()

    def test_shared_layer_across_isa_switch(self, rng):
        """Re-packing after an ISA switch keeps every concurrent call correct."""
        from pwcpu import _core

        weight = randn(rng, 48, 32)
        layer = pwcpu.PointwiseConv(weight)
        x = randn(rng, 1, 12, 12, 32)
        errors = []

        def work():
            try:
                for _ in range(200):
                    check_conv(layer(x), x, weight)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(50):
                for name in _core.runtime_info()["supported_isas"]:
                    _core.select_isa(name)
        finally:
            for t in threads:
                t.join()
            _core.select_isa("auto")
        assert not errors, errors[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_threads_does_not_hang(tmp_path):
    result = run_script(tmp_path, """
        import os, sys
        import numpy as np
        import pwcpu
        pwcpu.set_num_threads(2)
        x = np.ones((1, 64, 64, 64), np.float32)
        w = np.ones((64, 64), np.float32)
        pwcpu.conv1x1(x, w)  # starts the OpenMP thread pool
        pid = os.fork()
        if pid == 0:
            y = pwcpu.conv1x1(x, w)
            ok = bool(np.all(y == 64)) and pwcpu.get_num_threads() == 1
            ok = ok and pwcpu.runtime_info()["single_threaded_after_fork"]
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        print("parent threads", pwcpu.get_num_threads())
    """, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "child 0" in result.stdout
    assert "parent threads 2" in result.stdout or os.cpu_count() == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_pytorch_threads_does_not_hang(tmp_path):
    """PyTorch shares the OpenMP runtime: its pool, not pwcpu's, is what a child inherits here."""
    pytest.importorskip("torch")
    result = run_script(tmp_path, """
        import os
        import numpy as np
        import torch
        torch.set_num_threads(2)
        torch.ones(1000, 1000).sum()  # PyTorch's parallel region starts the OpenMP threads
        import pwcpu
        x = np.ones((1, 64, 64, 64), np.float32)
        w = np.ones((64, 64), np.float32)
        pid = os.fork()
        if pid == 0:
            y = pwcpu.conv1x1(x, w)  # big enough to use threads in the parent
            os._exit(0 if bool(np.all(y == 64)) and pwcpu.runtime_info()["single_threaded_after_fork"] else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "child 0" in result.stdout


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc to count threads")
def test_child_of_a_single_threaded_parent_keeps_its_threads(tmp_path):
    result = run_script(tmp_path, """
        import os
        import pwcpu
        pid = os.fork()  # no thread has started yet (NumPy's BLAS is limited to one below)
        if pid == 0:
            os._exit(3 if pwcpu.runtime_info()["single_threaded_after_fork"] else 0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """, timeout=60, env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    assert "child 0" in result.stdout


def test_spawned_workers_run_normally(tmp_path):
    result = run_script(tmp_path, """
        import multiprocessing as mp
        import numpy as np

        def work(seed):
            import pwcpu
            x = np.full((1, 16, 16, 32), seed, np.float32)
            return float(pwcpu.conv1x1(x, np.ones((8, 32), np.float32)).max()), pwcpu.get_num_threads()

        if __name__ == "__main__":
            import pwcpu
            pwcpu.conv1x1(np.ones((1, 32, 32, 32), np.float32), np.ones((8, 32), np.float32))
            with mp.get_context("spawn").Pool(2) as pool:
                print(pool.map(work, [1, 2]))
    """, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(32.0," in result.stdout and "(64.0," in result.stdout


def test_output_that_cannot_be_allocated_is_a_memory_error():
    x = np.broadcast_to(np.ones((1, 1, 1, 4), np.float32), (2**38, 1, 1, 4))
    with pytest.raises(MemoryError):
        pwcpu.conv1x1(x, np.ones((4, 4), np.float32))
    # So large that its size in bytes overflows 64 bits.
    with pytest.raises(MemoryError, match="too large to allocate"):
        pwcpu.conv1x1(np.ones((2, 1, 1, 4), np.float32), np.ones((4, 4), np.float32), padding=2**31 - 1)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("shape", [(2**61 - 1, 1), (1, 2**61 - 1), (2**40, 2**20), (2**33, 1)])
def test_weights_too_large_to_pack_are_an_error(shape, layout):
    """Broadcast weights describe absurd sizes without memory behind them: packing them is an
    error naming the weight, never a wrapped byte count and a short buffer."""
    weight = np.broadcast_to(np.float32(1), shape)
    x_shape = (1, 1, 1, shape[1]) if layout == "NHWC" else (1, shape[1], 1, 1)
    x = np.broadcast_to(np.float32(1), x_shape)
    with pytest.raises((ValueError, MemoryError), match="weight"):
        pwcpu.conv1x1(x, weight, layout=layout)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_stays_flat_over_100k_calls(rng):
    x, weight, bias = randn(rng, 1, 4, 4, 24), randn(rng, 16, 24), randn(rng, 16)
    layer = pwcpu.PointwiseConv(weight, bias, activation="silu")
    out = np.empty((1, 4, 4, 16), np.float32)
    for _ in range(2000):  # warm up allocator caches
        layer(x, out=out)
        pwcpu.conv1x1(x, weight, bias)
    before = _rss_bytes()
    for i in range(50_000):
        layer(x, residual=out, out=out)
        pwcpu.conv1x1(x, weight, bias, padding=1)
        if i % 5000 == 0:
            with pytest.raises(ValueError):
                pwcpu.conv1x1(x, weight, out=np.empty((1, 4, 4, 3), np.float32))
    growth = _rss_bytes() - before
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 100,000 calls"


def test_outputs_that_are_alive_never_share_memory(rng):
    """pwcpu reuses the memory of outputs that were freed, never of outputs still alive."""
    layers = [pwcpu.PointwiseConv(randn(rng, k, 16)) for k in (64, 96, 64)]
    x = randn(rng, 1, 64, 64, 16)  # outputs of 1-1.5 MiB
    alive = []  # (layer, output)
    for _ in range(4):
        for layer in layers:
            alive.append((layer, layer(x)))
            alive.append((layer, layer(x)))
            del alive[0]  # free one, keep the rest
    for i, (_, a) in enumerate(alive):
        for _, b in alive[i + 1:]:
            assert not np.shares_memory(a, b)
    for layer, y in alive:
        np.testing.assert_array_equal(y, layer(x))
