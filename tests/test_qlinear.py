"""Static int8: qlinear_conv1x1 / QuantizedPointwiseConv, ONNX QLinearConv semantics.

Every ISA path must equal, element for element, the exact integer sums requantized as ONNX Runtime
does it (pwcpu.reference.qlinear_conv1x1), full-range 8-bit activations and weights included; and
ONNX Runtime itself wherever it is exact (it is not for uint8 activations with full-range int8
weights on CPUs without VNNI: its vpmaddubsw path saturates at int16).
"""

import numpy as np
import pytest

import pwcpu
from pwcpu import reference


def full_range(rng, dtype, *shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape, dtype=dtype)


def layer_inputs(rng, x_dtype, w_dtype, c, k, per_channel=True, shape=(2, 5, 7)):
    x = full_range(rng, x_dtype, *shape, c)
    w = full_range(rng, w_dtype, k, c)
    info = np.iinfo(w_dtype)
    w_scale = (rng.random(k) * 0.02 + 1e-3).astype(np.float32) if per_channel else np.float32(0.004)
    w_zero = rng.integers(info.min, info.max + 1, k) if per_channel else (0 if w_dtype == np.int8 else 128)
    bias = rng.integers(-20000, 20000, k).astype(np.int32)
    x_zero = np.iinfo(x_dtype).min + 77
    # y_scale so that the outputs spread over the range, saturating at both ends now and then.
    return dict(x=x, x_scale=0.05, x_zero_point=x_dtype(x_zero), weight=w, w_scale=w_scale, w_zero_point=w_zero,
                y_scale=float(0.05 * np.mean(w_scale) * np.sqrt(c) * 40), y_zero_point=x_dtype(x_zero + 30), bias=bias)


def expected(args, **options):
    return reference.qlinear_conv1x1(**args, **options)


@pytest.mark.parametrize("x_dtype,w_dtype", [(np.uint8, np.int8), (np.int8, np.int8), (np.uint8, np.uint8)])
@pytest.mark.parametrize("c", [1, 2, 7, 33, 300])
@pytest.mark.parametrize("k", [1, 5, 16, 33])
def test_exact_against_the_integer_reference(isa, rng, x_dtype, w_dtype, c, k):
    args = layer_inputs(rng, x_dtype, w_dtype, c, k, per_channel=(c + k) % 2 == 0)
    y = pwcpu.qlinear_conv1x1(**args)
    assert y.dtype == x_dtype and y.shape == (2, 5, 7, k)
    np.testing.assert_array_equal(y, expected(args), err_msg=f"{isa} c={c} k={k}")
    info = np.iinfo(x_dtype)
    assert (y == info.min).any() or (y == info.max).any() or y.size < 50  # saturation is exercised


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
def test_weights_beyond_a_byte_take_the_int16_kernels(isa, rng, x_dtype):
    """Kernels that take weights as bytes (VNNI's and AMX's quads) cannot hold int8 weights less a zero point
    other than 0 (up to 255 in magnitude): such layers run the int16 kernels of the ISA below, and
    both kinds of layer stay exact."""
    kernels = {}
    for name, w_zero in [("bytes", 0), ("wide", -100)]:
        args = layer_inputs(rng, x_dtype, np.int8, 37, 20, per_channel=False)
        args["w_zero_point"] = w_zero
        layer = pwcpu.QuantizedPointwiseConv(args["weight"], args["w_scale"], w_zero, args["x_scale"],
                                             args["x_zero_point"], args["y_scale"], args["y_zero_point"], args["bias"])
        np.testing.assert_array_equal(layer(args["x"]), expected(args), err_msg=f"{isa} {name}")
        kernels[name] = layer.kernel
    int8_isa = pwcpu.runtime_info()["int8_isa"]
    assert kernels["bytes"].endswith("_" + int8_isa)
    if int8_isa in ("avx512vnni", "avx512amx"):
        assert kernels["wide"].endswith("_avx2")
    else:
        assert kernels["wide"] == kernels["bytes"]


# 5: odd groups, padded to pairs and quads; 4: whole quads, which VNNI kernels read in place (with
# weight zero points of 0: others leave VNNI for the int16 kernels).
@pytest.mark.parametrize("group_width,zero_weight_zero_points", [(5, False), (5, True), (4, True)])
def test_stride_padding_groups_and_views(isa, rng, group_width, zero_weight_zero_points):
    args = layer_inputs(rng, np.uint8, np.int8, 5, 12)
    if zero_weight_zero_points:
        args["w_zero_point"] = np.zeros(12, np.int8)
    big = full_range(rng, np.uint8, 2, 11, 13, 24)
    args["x"] = big[:, 1:10:2, ::-1, 2:2 + 4 * group_width]  # strided, reversed, a channel slice
    args["weight"] = args["weight"][:, :group_width]  # 4 groups
    options = dict(stride=2, padding=1, groups=4)
    y = pwcpu.qlinear_conv1x1(**args, **options)
    np.testing.assert_array_equal(y, expected(args, **options))
    # Padding reads x_zero_point, the real value 0: border outputs are the requantized bias.
    border = reference.qlinear_conv1x1(np.full((1, 1, 1, 4 * group_width), args["x_zero_point"], np.uint8),
                                       **{n: v for n, v in args.items() if n != "x"}, groups=4)
    np.testing.assert_array_equal(y[:, 0], np.broadcast_to(border[0, 0], y[:, 0].shape))


def test_rounding_is_to_nearest_even():
    # One channel, weight 1, scales 1 / 1 / 2: acc / 2 for acc = 1, 3, 5, 7 -> 0.5, 1.5, 2.5, 3.5.
    x = np.array([1, 3, 5, 7, -1, -3], np.int8).reshape(1, 1, 6, 1)
    y = pwcpu.qlinear_conv1x1(x, 1.0, np.int8(0), np.ones((1, 1), np.int8), 1.0, 0, 2.0, np.int8(0))
    np.testing.assert_array_equal(y.ravel(), [0, 2, 2, 4, 0, -2])


def test_packed_layer_out_and_threads(rng):
    args = layer_inputs(rng, np.uint8, np.int8, 96, 200, shape=(1, 16, 16))
    x = args.pop("x")
    layer = pwcpu.QuantizedPointwiseConv(args.pop("weight"), args.pop("w_scale"), args.pop("w_zero_point"),
                                         args.pop("x_scale"), args.pop("x_zero_point"), args.pop("y_scale"),
                                         args.pop("y_zero_point"), args.pop("bias"))
    assert layer.x_dtype == layer.y_dtype == np.uint8 and layer.kernel.startswith("int8_f32_") and "_gemm_" in layer.kernel
    assert "QuantizedPointwiseConv(96, 200" in repr(layer)
    with pwcpu.num_threads(1):
        one = layer(x)
    out = np.empty_like(one)
    with pwcpu.num_threads(2):
        assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, one)
    assert not layer.weight.flags.writeable


def test_pickling_keeps_the_layer(rng):
    """The packed layer travels (to Dask workers, to disk) and computes the same afterwards."""
    import pickle

    args = layer_inputs(rng, np.int8, np.uint8, 20, 12)
    x = args.pop("x")
    args["y_zero_point"] = np.uint8(9)  # a uint8 output from int8 input
    layer = pwcpu.QuantizedPointwiseConv(args["weight"], args["w_scale"], args["w_zero_point"], args["x_scale"],
                                         args["x_zero_point"], args["y_scale"], args["y_zero_point"], args["bias"],
                                         stride=2, padding=1)
    again = pickle.loads(pickle.dumps(layer))
    assert (again.x_dtype, again.y_dtype) == (np.int8, np.uint8) and repr(again) == repr(layer)
    np.testing.assert_array_equal(again(x), layer(x))


def test_output_type_follows_y_zero_point(rng):
    args = layer_inputs(rng, np.uint8, np.int8, 16, 8)
    args["y_zero_point"] = np.int8(-3)
    y = pwcpu.qlinear_conv1x1(**args)
    assert y.dtype == np.int8
    np.testing.assert_array_equal(y, expected(args, y_dtype=np.int8))


def test_weights_of_several_cache_blocks(isa, rng):
    """Deep and wide: a thread's panels take several L2 blocks, and its rows are widened up front."""
    args = layer_inputs(rng, np.uint8, np.int8, 4096, 96, shape=(1, 3, 5))
    args["weight"] = args["weight"][:, :2048]
    for threads in (1, 2):
        with pwcpu.num_threads(threads):
            y = pwcpu.qlinear_conv1x1(**args, groups=2)
        np.testing.assert_array_equal(y, expected(args, groups=2), err_msg=f"{isa} {threads} threads")


def _onnxruntime_qlinear_conv(args):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    w = args["weight"]
    k = w.shape[0]
    values = {"xs": np.array(args["x_scale"], np.float32), "xz": np.array(args["x_zero_point"]),
              "w": w.reshape(k, -1, 1, 1), "ws": np.asarray(args["w_scale"], np.float32),
              "wz": np.asarray(args["w_zero_point"], w.dtype), "ys": np.array(args["y_scale"], np.float32),
              "yz": np.array(args["y_zero_point"]), "b": args["bias"]}
    node = helper.make_node("QLinearConv", ["x", *values], ["y"], kernel_shape=[1, 1])
    types = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}
    graph = helper.make_graph([node], "qlinear", [helper.make_tensor_value_info("x", types[args["x"].dtype], None)],
                              [helper.make_tensor_value_info("y", types[values["yz"].dtype], None)],
                              [numpy_helper.from_array(v, n) for n, v in values.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ascontiguousarray(args["x"].transpose(0, 3, 1, 2))})[0].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("x_dtype,weight_bits", [(np.int8, 8), (np.uint8, 7), (np.int8, 7)])
def test_equals_onnxruntime_where_it_is_exact(rng, x_dtype, weight_bits):
    args = layer_inputs(rng, x_dtype, np.int8, 33, 20, shape=(1, 5, 100))
    limit = 2 ** (weight_bits - 1)
    args["weight"] = rng.integers(-limit, limit, (20, 33)).astype(np.int8)
    args["w_zero_point"] = np.zeros(20, np.int8)
    np.testing.assert_array_equal(pwcpu.qlinear_conv1x1(**args), _onnxruntime_qlinear_conv(args))


def test_exact_where_onnxruntime_saturates(rng):
    """uint8 activations with full-range int8 weights: pwcpu keeps the exact sums (ONNX Runtime's
    AVX2 path without VNNI does not, on this kind of data)."""
    args = layer_inputs(rng, np.uint8, np.int8, 33, 20, shape=(1, 5, 100))
    args["w_zero_point"] = np.zeros(20, np.int8)
    args["x"][...] = np.where(args["x"] > 127, 255, 0).astype(np.uint8)  # large pairs: int16 sums overflow
    np.testing.assert_array_equal(pwcpu.qlinear_conv1x1(**args), expected(args))


def test_errors(rng):
    args = layer_inputs(rng, np.uint8, np.int8, 8, 4)
    call = pwcpu.qlinear_conv1x1
    with pytest.raises(TypeError, match="x must be uint8"):
        call(**{**args, "x": args["x"].astype(np.float32), "x_zero_point": np.uint8(3)})
    with pytest.raises(TypeError, match="weight must be int8 or uint8"):
        call(**{**args, "weight": args["weight"].astype(np.float32)})
    with pytest.raises(TypeError, match="bias must be integers"):
        call(**{**args, "bias": args["bias"].astype(np.float32)})
    with pytest.raises(TypeError, match="y_zero_point must be a uint8 or int8"):
        call(**{**args, "y_zero_point": np.int32(5)})
    with pytest.raises(ValueError, match="x_zero_point must lie in uint8's range"):
        call(**{**args, "x_zero_point": 300})
    with pytest.raises(ValueError, match="x_scale must be finite and > 0"):
        call(**{**args, "x_scale": 0.0})
    with pytest.raises(ValueError, match="w_scale must be finite and > 0"):
        call(**{**args, "w_scale": np.float32(np.nan)})
    with pytest.raises(ValueError, match="w_zero_point must lie"):
        call(**{**args, "w_zero_point": np.full(4, 200)})
    with pytest.raises(ValueError, match="one per output channel"):
        call(**{**args, "w_scale": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="channels"):
        call(**{**args, "x": args["x"][..., :7]})
    with pytest.raises(ValueError, match="4-D"):
        call(**{**args, "x": args["x"][0]})
    with pytest.raises(TypeError, match="out must be uint8"):
        call(**args, out=np.empty((2, 5, 7, 4), np.int8))
    with pytest.raises(ValueError, match="out must have shape"):
        call(**args, out=np.empty((2, 5, 7, 5), np.uint8))
    with pytest.raises(ValueError, match="65536"):
        pwcpu.QuantizedPointwiseConv(np.ones((1, 65537), np.int8), 1.0, 0, 1.0, 0, 1.0, 0)
