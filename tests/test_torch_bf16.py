"""pwcpu.torch with precision="bf16" (and "int8" where the same holds): convert(model, precision=...),
the modules and the operators, and bfloat16 tensors."""

import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import pwcpu  # noqa: E402
import pwcpu.torch as pt  # noqa: E402
from pwcpu.torch_models import InvertedResidual, conv_bn, randomize_batchnorm  # noqa: E402


def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous().numpy()


REDUCED = ["bf16", "int8"]


@pytest.mark.parametrize("precision", REDUCED)
def test_converted_1x1_layers_compute_in_reduced_precision(precision):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(24, 16, 1), nn.ReLU(), nn.Flatten(2), nn.Linear(25, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = pt.convert(model, precision=precision)
    conv, linear = [m for m in converted.modules() if isinstance(m, (pt.PwcpuConv2d, pt.PwcpuLinear))]
    assert conv.precision == linear.precision == precision and f"precision='{precision}'" in repr(conv)
    x = torch.randn(2, 24, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = converted(x)
    # Layer by layer, what pwcpu's NumPy API computes at that precision.
    w, b = model[0].weight.detach().numpy()[:, :, 0, 0], model[0].bias.detach().numpy()
    h = pwcpu.conv1x1(nhwc(x), w, b, activation="relu", precision=precision)
    h = np.ascontiguousarray(h.transpose(0, 3, 1, 2).reshape(2, 16, 25))
    expected = pwcpu.pointwise(h, model[3].weight.detach().numpy(), model[3].bias.detach().numpy(),
                               precision=precision)
    np.testing.assert_array_equal(got.numpy(), expected)
    # And it is not the float32 result.
    with torch.inference_mode():
        assert not torch.equal(got, pt.convert(model)(x))


@pytest.mark.parametrize("precision", REDUCED)
def test_blocks_fuse_in_reduced_precision(precision):
    model = randomize_batchnorm(nn.Sequential(conv_bn(3, 16, 3, 2), InvertedResidual(16, 24, 2, 6),
                                              InvertedResidual(24, 24, 1, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = pt.convert(model, precision=precision)
    blocks = [m for m in converted.modules() if isinstance(m, pt.PwcpuInvertedResidual)]
    assert len(blocks) == 2 and all(b._block().precision == precision for b in blocks)
    pointwise = [m for m in converted.modules() if isinstance(m, pt.PwcpuConv2d)]
    assert pointwise and all(m.precision == precision for m in pointwise)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0])))
             for block in blocks]
    with torch.inference_mode():
        got, expected = converted(x), model(x)
        for hook in hooks:
            hook.remove()
        # The fused call is its layers (1x1 in reduced precision, depthwise in float32) run one by one.
        assert len(inputs) == 2
        for block, h in inputs:
            assert torch.equal(block(h), block._layer_by_layer(h))
    # bfloat16 keeps 8 significant bits, int8 256 levels: close to float32, not equal.
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    assert not torch.equal(got, expected)


def test_block_of_mixed_precisions_is_not_fused():
    layers = [pt.PwcpuConv2d(torch.randn(32, 8, 1, 1), None, activation="relu6", precision="bf16"),
              pt.PwcpuDepthwiseConv2d(torch.randn(32, 1, 3, 3), None, padding=(1, 1), activation="relu6"),
              pt.PwcpuConv2d(torch.randn(8, 32, 1, 1), None)]
    graph = torch.fx.symbolic_trace(nn.Sequential(*layers))
    report = []
    pt._fuse_inverted_residuals(graph, report)
    assert not report and not any(isinstance(m, pt.PwcpuInvertedResidual) for m in graph.modules())


def test_bfloat16_tensors_in_and_out():
    torch.manual_seed(1)
    conv = pt.PwcpuConv2d(torch.randn(8, 12, 1, 1), torch.randn(8), activation="silu", precision="bf16")
    linear = pt.PwcpuLinear(torch.randn(6, 12), torch.randn(6), precision="bf16")
    x = torch.randn(2, 12, 4, 3).to(torch.bfloat16)
    tokens = torch.randn(3, 5, 12).to(torch.bfloat16)
    r = torch.randn(2, 8, 4, 3).to(torch.bfloat16)
    with torch.inference_mode():
        y, z = conv(x, r), linear(tokens)
        assert y.dtype == z.dtype == torch.bfloat16
        assert torch.equal(y, conv(x.float(), r.float()).to(torch.bfloat16))
        assert torch.equal(z, linear(tokens.float()).to(torch.bfloat16))
        # channels_last memory, read as it is where the bf16 kernels take bfloat16 (the same values).
        x_last = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv(x_last, r), y) and torch.equal(conv(x_last), conv(x.float()).to(torch.bfloat16))
    # A float32 layer takes them too (the values widen exactly).
    plain = pt.PwcpuLinear(torch.randn(6, 12), None)
    with torch.inference_mode():
        assert torch.equal(plain(tokens), plain(tokens.float()).to(torch.bfloat16))


@pytest.mark.parametrize("precision", REDUCED)
def test_operators_take_the_precision(precision):
    torch.manual_seed(2)
    x = torch.randn(1, 10, 3, 3).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, 10, 1, 1), torch.randn(4)
    got = torch.ops.pwcpu.conv1x1(x, w, b, [1, 1], [0, 0], 1, None, None, precision)
    expected = pwcpu.conv1x1(nhwc(x), w.numpy()[:, :, 0, 0], b.numpy(), precision=precision)
    np.testing.assert_array_equal(nhwc(got), expected)
    t = torch.randn(5, 10)
    got = torch.ops.pwcpu.pointwise(t, w[:, :, 0, 0], b, None, None, precision)
    np.testing.assert_array_equal(got.numpy(), pwcpu.pointwise(t.numpy(), w.numpy()[:, :, 0, 0], b.numpy(),
                                                               precision=precision))
    with pytest.raises(ValueError, match="precision"):
        torch.ops.pwcpu.pointwise(t, w[:, :, 0, 0], b, None, None, "fp8")


def test_compiled_module_keeps_the_precision():
    layer = pt.PwcpuConv2d(torch.randn(8, 16, 1, 1), torch.randn(8), precision="bf16")
    x = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        eager = layer(x)
        compiled = torch.compile(layer, backend="eager")(x)
    assert torch.equal(eager, compiled)


def test_precision_survives_pickling_and_errors():
    layer = pt.PwcpuLinear(torch.randn(3, 4), None, precision="bf16")
    again = pickle.loads(pickle.dumps(layer))
    assert again.precision == "bf16"
    x = torch.randn(2, 4)
    with torch.inference_mode():
        assert torch.equal(again(x), layer(x))
    with pytest.raises(ValueError, match="precision"):
        pt.PwcpuLinear(torch.randn(3, 4), None, precision="half")
    with pytest.raises(ValueError, match="precision"):
        pt.convert(nn.Linear(4, 3), precision="int4")
