"""pytest-benchmark suite: every layer of pwcpu.benchmark.LAYERS, pwcpu and each installed peer.

    pip install ".[bench]"
    pytest bench/ --benchmark-group-by=param:layer --benchmark-columns=median,ops

Each result's extra_info carries the layer, the implementation, the thread count and its GFLOP/s
(from the median). Thread counts: PWCPU_BENCH_THREADS (default 1), fixed for every library.
"""

import importlib.util
import os

import pytest

from pwcpu import benchmark as pwbench

pytestmark = pytest.mark.filterwarnings("ignore")  # peers' own deprecation notices are not ours

THREADS = int(os.environ.get("PWCPU_BENCH_THREADS", "1"))
IMPLEMENTATIONS = {"pwcpu": pwbench.make_pwcpu, **pwbench.PEERS}


@pytest.fixture(scope="module", autouse=True)
def fixed_threads():
    with pwbench.fixed_threads(THREADS):
        yield


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("layer", pwbench.LAYERS, ids=lambda l: f"{l.network}-{l.n}x{l.h}x{l.w}x{l.c}-k{l.k}-s{l.stride}")
def test_layer(benchmark, layer, implementation):
    module = pwbench.PEER_MODULES.get(implementation)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    data = pwbench.LayerData.random(layer)
    run = IMPLEMENTATIONS[implementation](data, THREADS)
    pwbench.check_result(implementation, run(), data)
    benchmark.extra_info.update(layer=layer.label, implementation=implementation, threads=THREADS)
    benchmark(run)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gflops"] = layer.flops / median / 1e9

