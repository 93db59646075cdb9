"""Smoke tests of ``python -m pwcpu bench``: it runs, and its JSON records the machine."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest


def bench(tmp_path, *options, env=None):
    out = tmp_path / "result.json"
    environment = {k: v for k, v in os.environ.items() if k != "PWCPU_ISA"}
    environment.update(env or {})
    result = subprocess.run([sys.executable, "-m", "pwcpu", "bench", "--threads", "1", "--seconds", "0.01",
                             "--rounds", "1", "--pause", "0", "--json", str(out), *options],
                            capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def test_layer_run_records_the_machine(tmp_path):
    data, stdout = bench(tmp_path, "--suite", "resnet50", "--peers", "numpy")
    runtime = data["runtime"]
    for key in ("cpu_model", "isa", "kernel_main", "l1d_bytes", "l2_bytes", "l3_bytes", "threads"):
        assert runtime[key], key
    assert data["peaks_gflops"]["1"] > 0
    assert len(data["results"]) == 9 and all(r["gflops"]["pwcpu"] > 0 for r in data["results"])
    assert runtime["cpu_model"] in stdout


def test_isa_option_reruns_with_the_peers_held(tmp_path):
    data, stdout = bench(tmp_path, "--suite", "resnet50", "--peers", "numpy", "--isa", "scalar")
    assert data["runtime"]["isa"] == "scalar"
    assert data["runtime"]["peer_isa_limits"] == {"PWCPU_ISA": "scalar"}
    assert "peers held by: PWCPU_ISA=scalar" in stdout
    # No switch holds NumPy's BLAS to scalar code: timed and shown, outside the ratio.
    assert data["peers"] == ["numpy"] and data["compared_peers"] == []
    assert "not held to scalar" in stdout and all(r["ratio"] != r["ratio"] for r in data["results"])


def test_isa_option_compares_with_the_held_peers_only(tmp_path):
    import pwcpu

    if "avx2" not in pwcpu.runtime_info()["supported_isas"]:
        pytest.skip("no AVX2 here")
    pytest.importorskip("onnxruntime")
    data, stdout = bench(tmp_path, "--suite", "resnet50", "--peers", "numpy,onnxruntime", "--isa", "avx2")
    # ONNX Runtime has no switch to hold it to AVX2: timed and shown, outside the ratio.
    assert data["peers"] == ["numpy", "onnxruntime"] and data["compared_peers"] == ["numpy"]
    assert "not held to avx2" in stdout
    assert all(r["fastest_peer"] == "numpy" and r["ratio"] > 0 for r in data["results"])
    assert all(r["gflops"]["onnxruntime"] > 0 for r in data["results"])


def test_torch_overhead_run(tmp_path):
    pytest.importorskip("torch")
    data, _ = bench(tmp_path, "--overhead")
    assert {r["layer"] for r in data["overhead"]} >= {"64->16 1x1", "576->96 14x14"}
    assert all(r["us"]["converted"] > 0 for r in data["overhead"])


def test_depthwise_run_checks_and_times_every_layer(tmp_path):
    data, stdout = bench(tmp_path, "--depthwise", "--peers", "none")
    layers = data["depthwise"]
    assert len(layers) == 19 and all(r["us"]["pwcpu"] > 0 for r in layers)
    assert data["runtime"]["kernel_depthwise"] in stdout
    assert "efficientnet_b0 7x7x1152 5x5/1" in stdout


def test_dense_run_checks_and_times_every_layer(tmp_path):
    peers = "torch.conv2d" if importlib.util.find_spec("torch") else "none"
    data, stdout = bench(tmp_path, "--dense", "--peers", peers)
    layers = data["dense"]
    assert len(layers) == 9 and all(r["us"]["pwcpu"] > 0 for r in layers)
    assert "resnet50 stem 224x224x3->64 7x7/2" in stdout and "resnet50 7x7x512->512 3x3/1" in stdout
    if peers != "none":
        assert all(r["us"]["torch.conv2d"] > 0 for r in layers)


@pytest.mark.skipif(importlib.util.find_spec("distributed") is None, reason="needs pwcpu[dask]")
def test_dask_cluster_run_records_throughput_and_busy_cores(tmp_path):
    data, stdout = bench(tmp_path, "--dask", "--dask-gib", "0.02")
    rows = data["dask"]
    assert {(r["layer"], r["workers"]) for r in rows} == {(name, w) for name in ("hyperspectral stack", "feature map")
                                                          for w in (2, 1)}
    for row in rows:
        assert set(row["gb_per_s"]) == ({"pwcpu", "numpy"} if row["workers"] == 2 else {"pwcpu"})
        assert all(v > 0 for v in row["gb_per_s"].values())
        for busy in row["cores_busy"].values():
            # CPU seconds per second: nobody more than the machine has.
            assert 0 <= busy["workers"] <= row["cores"] + 0.5 and 0 <= busy["scheduler_and_client"] <= row["cores"] + 0.5
    # And the computing workers did some work: CPU time is counted in clock ticks (10 ms), which a
    # fast machine's round of this small array may end within, so not in every row.
    assert max(busy["workers"] for row in rows for busy in row["cores_busy"].values()) > 0
    assert "cores busy" in stdout


def test_bf16_precision_run(tmp_path):
    data, stdout = bench(tmp_path, "--suite", "resnet50", "--precision", "bf16")
    assert data["precision"] == "bf16" and len(data["results"]) == 9
    for row in data["results"]:
        assert row["gflops"]["bf16"] > 0 and row["gflops"]["fp32"] > 0
        assert row["over_fp32"] == pytest.approx(row["gflops"]["bf16"] / row["gflops"]["fp32"])
        if importlib.util.find_spec("torch") is not None:
            assert row["over_torch"] == pytest.approx(row["gflops"]["bf16"] / row["gflops"]["torch"])
            if "bf16_io" in row["gflops"]:  # bfloat16 arrays in and out (ml_dtypes)
                assert row["bf16_io_over_torch"] == pytest.approx(row["gflops"]["bf16_io"] / row["gflops"]["torch"])
    assert "geometric mean bf16 over fp32" in stdout


def test_int8_precision_run(tmp_path):
    data, stdout = bench(tmp_path, "--suite", "resnet50", "--precision", "int8")
    assert data["precision"] == "int8" and len(data["results"]) == 9
    for row in data["results"]:
        assert row["gflops"]["int8"] > 0 and row["gflops"]["fp32"] > 0 and row["gflops"]["qlinear"] > 0
        assert "torch" not in row["gflops"]
        if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None:
            assert row["qlinear_over_ort"] == pytest.approx(row["gflops"]["qlinear"] / row["gflops"]["ort_qlinear"])
        if importlib.util.find_spec("torch") is not None:
            assert row["qlinear_over_torch"] == pytest.approx(row["gflops"]["qlinear"] / row["gflops"]["torch_qconv"])
        if importlib.util.find_spec("tensorflow") is not None:
            assert row["qlinear_over_tflite"] == pytest.approx(row["gflops"]["qlinear"] / row["gflops"]["tflite_int8"])
        # 8-bit quantization of N(0, 1) data: about 1 % RMS, and pwcpu adds nothing to the scheme's own
        # error (its integer sums are exact).
        assert 1e-3 < row["rms_error"] < 0.03
        assert row["rms_error_over_exact_scheme"] == pytest.approx(1.0, abs=0.01)
    assert "geometric mean int8 over fp32" in stdout and "RMS error" in stdout
