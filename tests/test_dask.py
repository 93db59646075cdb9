"""pwcpu on Dask arrays: bitwise equal to the in-memory calls on every chunking, the layer in the
graph once, threads per worker, and a worker lost mid-computation (skipped without Dask)."""

import contextlib
import os
import warnings

import numpy as np
import pytest

import pwcpu

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
pwcpu_dask = pytest.importorskip("pwcpu.dask")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def data(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def compute(y):
    with dask.config.set(scheduler="synchronous"):
        return y.compute()


@st.composite
def chunked_layers(draw):
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 13)), draw(st.integers(1, 13))
    groups = draw(st.sampled_from([1, 2, 3]))
    c, k = groups * draw(st.integers(1, 12)), groups * draw(st.integers(1, 12))
    chunks = (draw(st.integers(1, n)), draw(st.integers(1, h)), draw(st.integers(1, w)), draw(st.integers(1, c)))
    options = dict(stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                   padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))), groups=groups,
                   activation=draw(st.sampled_from(list(pwcpu.ACTIVATIONS))))
    return (n, h, w, c, k), chunks, options, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**31))


@settings(max_examples=60, deadline=None)
@given(chunked_layers())
def test_conv1x1_equals_the_in_memory_call_bitwise(case):
    (n, h, w, c, k), chunks, options, with_bias, with_residual, seed = case
    rng = np.random.default_rng(seed)
    x, weight = data(rng, n, h, w, c), data(rng, k, c // options["groups"])
    bias = data(rng, k) if with_bias else None
    expected = pwcpu.conv1x1(x, weight, bias, **options)
    residual = data(rng, *expected.shape) if with_residual else None
    if residual is not None:
        expected = pwcpu.conv1x1(x, weight, bias, residual=residual, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pwcpu_dask.PwcpuDaskWarning)
        y = pwcpu_dask.conv1x1(da.from_array(x, chunks=chunks), weight, bias,
                               residual=None if residual is None else da.from_array(residual, chunks=3), **options)
    assert isinstance(y, da.Array) and y.dtype == np.float32 and y.shape == expected.shape
    np.testing.assert_array_equal(compute(y), expected)


@pytest.mark.parametrize("shape,chunks", [((40, 7), (9, 7)), ((3, 5, 6, 16), (2, 2, 5, 16)), ((16,), (16,))])
def test_pointwise_over_leading_axes(rng, shape, chunks):
    c = shape[-1]
    x, weight, bias = data(rng, *shape), data(rng, 24, c), data(rng, 24)
    residual = data(rng, *shape[:-1], 24)
    y = pwcpu_dask.pointwise(da.from_array(x, chunks=chunks), weight, bias, activation="gelu",
                             residual=da.from_array(residual))
    assert y.chunks[:-1] == da.from_array(x, chunks=chunks).chunks[:-1] and y.chunks[-1] == (24,)
    np.testing.assert_array_equal(compute(y), pwcpu.pointwise(x, weight, bias, activation="gelu", residual=residual))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precisions_whatever_the_chunking(rng, precision):
    """A layer's precision survives its trip to the workers, stride and padding included; int8
    quantizes each pixel on its own, so chunks do not change a bit."""
    x, weight, bias = data(rng, 2, 9, 10, 24), data(rng, 16, 24), data(rng, 16)
    options = dict(stride=2, padding=1, activation="relu", precision=precision)
    expected = pwcpu.conv1x1(x, weight, bias, **options)
    assert not np.array_equal(expected, pwcpu.conv1x1(x, weight, bias, stride=2, padding=1, activation="relu"))
    for chunks in [(1, 4, 3, 24), (2, 9, 10, 24)]:
        lazy = da.from_array(x, chunks=chunks)
        np.testing.assert_array_equal(compute(pwcpu_dask.conv1x1(lazy, weight, bias, **options)), expected)
        layer = pwcpu.PointwiseConv(weight, bias, **options)
        np.testing.assert_array_equal(compute(layer(lazy)), expected)
    tokens = data(rng, 40, 24)
    np.testing.assert_array_equal(compute(pwcpu_dask.pointwise(da.from_array(tokens, chunks=(7, 24)), weight,
                                                               precision=precision)),
                                  pwcpu.pointwise(tokens, weight, precision=precision))


def test_split_channels_are_rechunked_with_a_warning(rng):
    x, weight = data(rng, 1, 6, 6, 20), data(rng, 8, 20)
    with pytest.warns(pwcpu_dask.PwcpuDaskWarning, match="channel axis is split over 3 chunks"):
        y = pwcpu_dask.conv1x1(da.from_array(x, chunks=(1, 3, 6, 7)), weight)
    assert y.chunks == ((1,), (3, 3), (6,), (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole channels: no warning
        pwcpu_dask.conv1x1(da.from_array(x, chunks=(1, 3, 6, 20)), weight)


def test_the_layer_enters_the_graph_once(rng):
    x = da.from_array(data(rng, 2, 12, 10, 16), chunks=(1, 4, 5, 16))
    layer = pwcpu.PointwiseConv(data(rng, 32, 16), data(rng, 32), activation="relu")
    y = layer(x)  # a PointwiseConv takes Dask arrays as they are
    assert isinstance(y, da.Array)
    graph = dict(y.__dask_graph__())
    layer_keys = [key for key in graph if "PointwiseConv" in str(key)]
    tasks = [key for key in graph if isinstance(key, tuple) and key[0].startswith("pwcpu-conv1x1")]
    assert len(layer_keys) == 1 and len(tasks) == 2 * 3 * 2
    assert all(layer_keys[0] in graph[key].dependencies for key in tasks)
    np.testing.assert_array_equal(compute(y), layer(x.compute()))


def test_errors(rng):
    x = da.from_array(data(rng, 1, 4, 4, 8))
    weight = data(rng, 6, 8)
    with pytest.raises(TypeError, match="float32"):
        pwcpu_dask.conv1x1(x.astype(np.float64), weight)
    with pytest.raises(TypeError, match="dask.array.Array"):
        pwcpu_dask.conv1x1(np.zeros((1, 4, 4, 8), np.float32), weight)
    with pytest.raises(ValueError, match="x has 8 channels but the layer expects C = 7"):
        pwcpu_dask.conv1x1(x, data(rng, 6, 7))
    with pytest.raises(ValueError, match="4 axes"):
        pwcpu_dask.conv1x1(x[0], weight)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        pwcpu_dask.conv1x1(x, weight, residual=da.zeros((1, 4, 4, 5), dtype=np.float32))
    layer = pwcpu.PointwiseConv(weight)
    with pytest.raises(ValueError, match="out= cannot be used with a Dask array"):
        layer(x, out=np.zeros((1, 4, 4, 6), np.float32))
    with pytest.raises(ValueError, match="pass bias"):
        pwcpu_dask.conv1x1(x, layer, data(rng, 6))
    with pytest.raises(ValueError, match="NHWC"):
        pwcpu_dask.apply(pwcpu.PointwiseConv(weight, layout="NCHW"), x)
    with pytest.raises(ValueError, match="without stride"):
        pwcpu_dask.pointwise(x, pwcpu.PointwiseConv(weight, stride=2))


def test_xarray_apply_ufunc(rng):
    xr = pytest.importorskip("xarray")
    cube = xr.DataArray(data(rng, 30, 20, 12), dims=("y", "x", "band")).chunk({"y": 8})
    weight = data(rng, 4, 12)
    mapped = xr.apply_ufunc(pwcpu.pointwise, cube, input_core_dims=[["band"]], output_core_dims=[["feature"]],
                            dask="parallelized", output_dtypes=[np.float32], kwargs={"weight": weight},
                            dask_gufunc_kwargs={"output_sizes": {"feature": 4}})
    np.testing.assert_array_equal(mapped.compute().values, pwcpu.pointwise(cube.values, weight))


# ---- a real cluster: worker processes ---------------------------------------------------------

distributed = pytest.importorskip("distributed")


@contextlib.contextmanager
def local_cluster(**options):
    """A LocalCluster of worker processes and its client. Its nannies set the variables they give
    workers (OMP_NUM_THREADS=1, ...) in this process's environment too: restored after, so that
    later tests' subprocesses do not inherit them."""
    saved = dict(os.environ)
    try:
        with distributed.LocalCluster(processes=True, dashboard_address=":0", silence_logs=50, **options) as cluster, \
                distributed.Client(cluster) as c:
            yield c
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def client():
    # Workers that OpenMP would let run 2 threads each (Dask's default gives them 1): what keeps a
    # task to its worker's single thread is then pwcpu.dask itself.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": 2}), \
            local_cluster(n_workers=2, threads_per_worker=1) as c:
        yield c


def _threads_seen(block):
    """In a task: how many threads a pwcpu call would use there, and the worker's OMP_NUM_THREADS."""
    with pwcpu_dask._task_threads():
        seen = [pwcpu.get_num_threads(), int(os.environ["OMP_NUM_THREADS"])]
    return np.array(seen, np.int64).reshape(1, 1, 1, 2)


def test_on_a_cluster_of_worker_processes(client, rng):
    x, weight, bias = data(rng, 2, 40, 30, 24), data(rng, 48, 24), data(rng, 48)
    layer = pwcpu.PointwiseConv(weight, bias, stride=2, padding=1, activation="silu")
    y = layer(da.from_array(x, chunks=(1, 9, 30, 24)))
    np.testing.assert_array_equal(client.compute(y).result(), layer(x))
    # Each worker has one thread: every task computes single-threaded.
    threads = da.from_array(x, chunks=(1, 9, 30, 24)).map_blocks(_threads_seen, dtype=np.int64,
                                                                  chunks=((1,) * 2, (1,) * 5, (1,), (2,)))
    seen = client.compute(threads).result().reshape(-1, 2)
    assert (seen[:, 1] == 2).all() and (seen[:, 0] == 1).all(), seen


def test_a_lost_worker_loses_nothing(rng):
    """Chunks computed on a worker that then dies are computed again elsewhere: the result is the
    same, bit for bit."""
    x = data(rng, 4, 64, 48, 32)
    layer = pwcpu.PointwiseConv(data(rng, 64, 32), data(rng, 64), activation="relu")
    expected = layer(x)
    with local_cluster(n_workers=2, threads_per_worker=1) as client:
        y = client.persist(layer(da.from_array(x, chunks=(1, 16, 48, 32))))
        distributed.wait(y)
        holders = client.who_has(y)
        victim = next(iter({w for workers in holders.values() for w in workers}))
        held = sum(victim in workers for workers in holders.values())
        assert held > 0
        with pytest.raises(Exception):  # the worker dies before it can answer
            client.run(os._exit, 1, workers=[victim])
        np.testing.assert_array_equal(client.compute(y).result(), expected)
        assert victim not in client.scheduler_info()["workers"]  # its chunks came from elsewhere
