"""Every malformed call raises TypeError or ValueError naming the argument, and changes nothing."""

import numpy as np
import pytest

import pwcpu
from pwcpu import _core


def f32(*shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 7


X = f32(2, 5, 5, 6)
W = f32(4, 6)
B = f32(4)
OUT_SHAPE = (2, 5, 5, 4)


def call_unchanged(error, match, *args, **kwargs):
    """Call conv1x1 expecting `error`; every array argument must be unchanged afterwards."""
    arrays = [a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)]
    before = [a.copy() for a in arrays]
    with pytest.raises(error, match=match):
        pwcpu.conv1x1(*args, **kwargs)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int64, np.bool_, np.complex64, ">f4"])
def test_wrong_dtype_x(dtype):
    call_unchanged(TypeError, r"x must be float32.*astype\(np.float32\)", X.astype(dtype), W)


def test_python_lists_need_an_explicit_dtype():
    call_unchanged(TypeError, r"np.asarray\(x, dtype=np.float32\)", X.tolist(), W)


@pytest.mark.parametrize("value", [None, "abc", object()])
def test_non_array_x(value):
    call_unchanged(TypeError, "x must", value, W)


@pytest.mark.parametrize("shape", [(6,), (5, 6), (1, 2, 5, 5, 6)])
def test_wrong_rank_x(shape):
    call_unchanged(ValueError, r"x must have shape \(N, H, W, C\)", f32(*shape), W)


def test_channel_mismatch():
    call_unchanged(ValueError, "x has 6 channels but the weight expects C = 5", X, f32(4, 5))


def test_wrong_weight():
    call_unchanged(TypeError, "weight must be float32", X, W.astype(np.float64))
    call_unchanged(ValueError, "weight must have shape", X, f32(4))
    call_unchanged(ValueError, "weight must have a 1x1 kernel", X, f32(4, 6, 3, 3))


def test_wrong_bias():
    call_unchanged(ValueError, r"bias must have shape \(4,\)", X, W, f32(5))
    call_unchanged(ValueError, r"bias must have shape \(4,\)", X, W, f32(4, 1))
    call_unchanged(TypeError, "bias must be float32", X, W, B.astype(np.float64))


@pytest.mark.parametrize("name", ["stride", "padding"])
def test_bad_stride_and_padding(name):
    minimum = 1 if name == "stride" else 0
    call_unchanged(ValueError, f"{name} must be between {minimum}", X, W, **{name: minimum - 1})
    call_unchanged(ValueError, f"{name} must be between", X, W, **{name: (1, 2**40)})
    call_unchanged(ValueError, f"{name} must be an int or a pair", X, W, **{name: (1, 1, 1)})
    call_unchanged(TypeError, f"{name} must be an int", X, W, **{name: 1.5})
    call_unchanged(TypeError, f"{name} must be an int", X, W, **{name: "2"})
    call_unchanged(TypeError, f"{name} must be an int", X, W, **{name: True})


def test_bad_groups():
    call_unchanged(ValueError, "groups must be between 1", X, W, groups=0)
    call_unchanged(TypeError, "groups must be an int", X, W, groups=2.0)
    call_unchanged(ValueError, "groups=3 must divide the output channels", X, f32(4, 2), groups=3)
    call_unchanged(ValueError, "x has 6 channels", X, f32(4, 2), groups=2)  # 2 * 2 != 6


def test_bad_activation():
    call_unchanged(ValueError, "activation must be one of", X, W, activation="tanh")
    call_unchanged(TypeError, "activation must be None or a string", X, W, activation=1)


def test_bad_residual():
    call_unchanged(ValueError, "residual must have the output's shape", X, W, residual=f32(2, 5, 5, 3))
    call_unchanged(TypeError, "residual must be float32", X, W, residual=np.zeros(OUT_SHAPE))


def test_bad_out():
    call_unchanged(TypeError, "out must be a NumPy array", X, W, out=np.zeros(OUT_SHAPE).tolist())
    call_unchanged(TypeError, "out must be float32", X, W, out=np.zeros(OUT_SHAPE))
    call_unchanged(ValueError, r"out must have shape \(2, 5, 5, 4\)", X, W, out=np.zeros((2, 5, 5, 5), np.float32))
    read_only = np.zeros(OUT_SHAPE, np.float32)
    read_only.flags.writeable = False
    call_unchanged(ValueError, "out must be writable", X, W, out=read_only)
    strided = np.zeros((2, 5, 5, 8), np.float32)[..., ::2]
    call_unchanged(ValueError, "contiguous channel", X, W, out=strided)
    unaligned = np.zeros(np.prod(OUT_SHAPE) * 4 + 1, np.uint8)[1:].view(np.float32).reshape(OUT_SHAPE)
    call_unchanged(ValueError, "aligned", X, W, out=unaligned)


def test_out_overlapping_an_input():
    shared = np.zeros((2, 5, 5, 10), np.float32)
    x, out = shared[..., :6], shared[..., 4:8]
    call_unchanged(ValueError, "out overlaps x", x, W, out=out)
    memory = np.zeros(100, np.float32)
    weight, out = memory[:24].reshape(4, 6), memory[10:26].reshape(1, 1, 4, 4)
    call_unchanged(ValueError, "out overlaps weight", f32(1, 1, 4, 6), weight, out=out)


def test_out_partly_overlapping_residual():
    buffer = np.zeros((2, 5, 5, 6), np.float32)
    call_unchanged(ValueError, "must not partly overlap", X, W, residual=buffer[..., 2:6], out=buffer[..., :4])


def test_pointwise_errors():
    with pytest.raises(ValueError, match="at least one axis"):
        pwcpu.pointwise(np.float32(1), W)
    with pytest.raises(ValueError, match="x has 5 channels"):
        pwcpu.pointwise(f32(3, 5), W)
    with pytest.raises(TypeError, match="x must be float32"):
        pwcpu.pointwise(np.zeros((3, 6)), W)


def test_layer_errors():
    layer = pwcpu.PointwiseConv(W, B)
    with pytest.raises(ValueError, match="x has 5 channels"):
        layer(f32(1, 2, 2, 5))
    with pytest.raises(TypeError, match="weight must be float32"):
        pwcpu.PointwiseConv(W.astype(np.float64))
    with pytest.raises(ValueError, match="activation must be one of"):
        pwcpu.PointwiseConv(W, activation="swish")


def test_thread_and_isa_controls():
    with pytest.raises(ValueError, match=">= 1"):
        pwcpu.set_num_threads(0)
    with pytest.raises(TypeError, match="must be an int"):
        pwcpu.set_num_threads("2")
    with pytest.raises(ValueError, match="not a known ISA"):
        _core.select_isa("sse9")
    assert _core.active_isa() in _core.runtime_info()["supported_isas"]


def test_out_that_overlaps_itself():
    """A writable zero or overlapping stride would make several outputs share memory."""
    base = np.zeros(OUT_SHAPE, np.float32)
    zero_stride = np.lib.stride_tricks.as_strided(base, OUT_SHAPE, (0,) + base.strides[1:])
    call_unchanged(ValueError, "out must not overlap itself", X, W, out=zero_stride)
    call_unchanged(ValueError, "out must not overlap itself", X, W, residual=zero_stride, out=zero_stride)
    rows_overlap = np.lib.stride_tricks.as_strided(base, OUT_SHAPE, (400, 80, 8, 4))  # pixels 2 floats apart
    call_unchanged(ValueError, "out must not overlap itself", X, W, out=rows_overlap)
    tokens = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="out must not overlap itself"):
        pwcpu.pointwise(f32(3, 6), W, out=np.lib.stride_tricks.as_strided(tokens, (3, 4), (0, 4)))


def test_masked_arrays_are_refused():
    masked = np.ma.masked_array(X, mask=X > 1)
    call_unchanged(TypeError, r"x is a masked array.*x.filled", masked, W)
    call_unchanged(TypeError, "weight is a masked array", X, np.ma.masked_array(W))
    call_unchanged(TypeError, "residual is a masked array", X, W, residual=np.ma.masked_array(np.zeros(OUT_SHAPE, np.float32)))


def test_integer_like_geometry_and_errors_that_name_the_argument():
    assert pwcpu.conv1x1(X, W, stride=np.array(2)).shape == (2, 3, 3, 4)
    assert pwcpu.conv1x1(X, W, stride=np.int64(2), padding=np.array([1, 0])).shape == (2, 4, 3, 4)
    call_unchanged(TypeError, "stride must be an int", X, W, stride=np.array([2.5, 1.0]))
    call_unchanged(TypeError, "stride must be an int", X, W, stride=np.array(2.0))
    with pytest.raises(MemoryError, match=r"output of shape \(1, 1, 4294967295, 1024\)"):
        pwcpu.conv1x1(f32(1, 1, 1, 6), np.ones((1024, 6), np.float32), padding=(0, 2**31 - 1))


def test_layer_weights_cannot_be_made_writable():
    layer = pwcpu.PointwiseConv(W, B)
    for array in (layer.weight, layer.bias):
        with pytest.raises(ValueError):
            array.flags.writeable = True
        with pytest.raises(ValueError):
            array[0] = 1
    np.testing.assert_array_equal(layer.weight, W)
