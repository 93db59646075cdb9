import os
import zlib

# Layers take their kernels by the speeds in pwcpu's tables, not by speeds timed on this machine:
# the same kernels run on every machine, and every kernel is reachable (test_runtime covers the
# timed choice). Set before pwcpu chooses its kernels.
os.environ["PWCPU_KERNEL_TIMING"] = "0"

import numpy as np
import pytest

import pwcpu
from pwcpu import _core

SUPPORTED_ISAS = _core.runtime_info()["supported_isas"]


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Run the test once per ISA this machine supports, restoring the automatic choice after."""
    _core.select_isa(request.param)
    try:
        yield request.param
    finally:
        _core.select_isa("auto")


@pytest.fixture
def rng(request):
    # A seed per test id: failures reproduce, and tests do not share random streams.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def rows_taken_first():
    """Threads start on the others' rows, from their ends (the path a thread takes once its own
    rows are done, when another is held up): every call of a layer that balances rows runs it."""
    _core.set_take_rows_first(True)
    try:
        yield
    finally:
        _core.set_take_rows_first(False)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = pwcpu.get_num_threads()
    yield
    pwcpu.set_num_threads(before)
