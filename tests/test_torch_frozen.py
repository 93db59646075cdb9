"""The PyTorch bridge holds what it converted: frozen weights, no stale packing, no leaks, exact
equivalence where convert cannot see the module graph, and clear errors."""

import gc
import weakref

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import pwcpu.torch as pt  # noqa: E402
from pwcpu.torch_models import randomize_batchnorm  # noqa: E402


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_writes_that_bypass_the_version_counter_cannot_make_weights_stale():
    layer = pt.PwcpuConv2d.from_modules(nn.Conv2d(8, 8, 1))
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        before = layer(x)
    layer.weight.data.mul_(2)  # a copy: the layer is unchanged
    layer.weight.numpy()[...] = 0
    torch.from_numpy(layer.bias.numpy()).fill_(5)
    with torch.inference_mode():
        close(layer(x), before)
        new_weight = torch.randn(8, 8, 1, 1)
        layer.weight = new_weight  # assignment re-packs
        close(layer(x), nn.functional.conv2d(x, new_weight, layer.bias))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"}
    close(state["weight"], new_weight)


def test_the_functional_operator_never_caches_a_users_weight():
    x, w = torch.randn(1, 8, 3, 3), torch.randn(8, 8, 1, 1)
    first = torch.ops.pwcpu.conv1x1(x, w)
    w.data.mul_(2)
    close(torch.ops.pwcpu.conv1x1(x, w), 2 * first)


def test_converted_and_run_in_inference_mode():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU()))
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        converted = pt.convert(model)
        close(converted(x), model(x))
        close(converted(x), model(x))


def test_load_state_dict_reaches_the_fused_layers():
    """Module by module (an untraceable model), the converted copy keeps the original's state dict
    and fused layers follow what is loaded into it."""

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())

        def forward(self, x):
            return self.seq(x) if bool(x.sum() > -1e30) else x

    def build():
        return randomize_batchnorm(Untraceable())

    model, other = build(), build()
    with torch.no_grad():
        other.seq[0].weight.mul_(3)
        other.seq[1].running_mean.add_(1)
    converted = pt.convert(model)
    assert isinstance(converted.seq, pt.PwcpuSequential)
    assert set(converted.state_dict()) == set(model.state_dict())
    converted.load_state_dict(other.state_dict())
    x = torch.randn(1, 8, 6, 6)
    with torch.inference_mode():
        close(converted(x), other(x))


def test_traced_copy_state_dict_round_trips():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6()))
    converted, again = pt.convert(model), pt.convert(model)
    state = converted.state_dict()
    assert set(state) == {"0.weight", "0.bias"}  # BatchNorm folded in
    with torch.no_grad():
        state["0.weight"].mul_(2)
    again.load_state_dict(state)
    x = torch.randn(1, 8, 6, 6)
    with torch.inference_mode():
        close(again(x), nn.functional.relu6(nn.functional.conv2d(x, state["0.weight"], state["0.bias"])))


class CallsChildrenOneByOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = self.seq[0](x)
        return self.seq[2](self.seq[1](y)) + y


class StandardizedConv(nn.Conv2d):  # traced into: its F.conv2d stays PyTorch's
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias)


def test_convert_is_exact_where_it_cannot_see_the_graph():
    model = randomize_batchnorm(CallsChildrenOneByOne())
    converted = pt.convert(model)
    x = torch.randn(1, 8, 5, 5)
    with torch.inference_mode():
        close(converted(x), model(x))


def test_subclasses_with_their_own_forward_and_hooked_layers_are_left_alone():
    hooked = nn.Conv2d(4, 4, 1)
    calls = []
    hooked.register_forward_hook(lambda module, args, out: calls.append(1))
    model = nn.Sequential(StandardizedConv(4, 4, 1), hooked, nn.Conv2d(4, 4, 1))
    with pytest.warns(pt.PwcpuConversionWarning) as warned:
        converted = pt.convert(model)
    assert type(converted.get_submodule("1")) is nn.Conv2d
    assert isinstance(converted.get_submodule("2"), pt.PwcpuConv2d)
    report = "; ".join(converted.pwcpu_report)
    assert "it has hooks" in report
    assert "left layers to PyTorch" in str(warned[0].message)
    x = torch.randn(1, 4, 3, 3)
    with torch.inference_mode():
        close(converted(x), model(x))
    assert len(calls) == 2  # the hook still fires in the copy


def test_batchnorm_without_affine_parameters():
    model = nn.Sequential(nn.Conv2d(6, 10, 1), nn.BatchNorm2d(10, affine=False), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    converted = pt.convert(model)
    x = torch.randn(1, 6, 4, 4)
    with torch.inference_mode():
        close(converted(x), model(x))


def test_deleted_models_free_their_packed_weights():
    def convert_and_run():
        model = pt.convert(nn.Sequential(*[nn.Conv2d(64, 64, 1) for _ in range(8)]))
        with torch.inference_mode():
            model(torch.randn(1, 64, 4, 4))
        return weakref.ref(model), weakref.ref(model.get_submodule("0")._layer)

    gc.collect()
    before = len(pt._private_weights)
    refs = [convert_and_run() for _ in range(3)]
    gc.collect()
    assert all(model() is None and layer() is None for model, layer in refs)
    assert len(pt._private_weights) <= before


def test_gradients_are_refused_not_dropped():
    layer = pt.PwcpuConv2d.from_modules(nn.Conv2d(4, 4, 1))
    x = torch.randn(1, 4, 2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference module"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == (1, 4, 2, 2)


def test_operator_defaults_and_errors_name_the_argument():
    x, w = torch.randn(1, 8, 3, 3), torch.randn(4, 8, 1, 1)
    close(torch.ops.pwcpu.conv1x1(x, w), nn.functional.conv2d(x, w))
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\), got \(8, 3, 3\)"):
        torch.ops.pwcpu.conv1x1(x[0], w)
    with pytest.raises(TypeError, match="x must be float32, got torch.bfloat16"):
        torch.ops.pwcpu.conv1x1(x.bfloat16(), w)
    with pytest.raises(TypeError, match="weight must be float32"):
        torch.ops.pwcpu.conv1x1(x, w.double())
    with pytest.raises(ValueError, match="x has 7 channels"):
        torch.ops.pwcpu.conv1x1(x[:, :7], w)
    layer = pt.PwcpuConv2d.from_modules(nn.Conv2d(8, 4, 1))
    with pytest.raises(TypeError, match="x must be float32"):
        layer(x.double())
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\)"):
        layer(x[0])


def test_linear_layers_and_a_fused_activation():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    converted = pt.convert(model)
    assert converted.pwcpu_report == ["0: pwcpu (fused gelu)", "2: pwcpu"]
    assert isinstance(converted.get_submodule("2"), pt.PwcpuLinear)
    tokens = torch.randn(2, 7, 7, 32)  # ConvNeXt's channels-last features
    with torch.inference_mode():
        close(converted(tokens), model(tokens))
        close(converted(tokens[:, ::2]), model(tokens[:, ::2]))


def test_channels_last_and_contiguous_models_convert_alike():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                              nn.Conv2d(8, 16, 1)))
    converted = pt.convert(model)
    assert converted.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 6, 6)
    with torch.inference_mode():
        y = converted(x)
        close(y, model(x))
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_pickle_and_deepcopy_keep_the_layer():
    import copy
    import pickle

    layer = pt.PwcpuConv2d.from_modules(nn.Conv2d(8, 4, 1), activation="relu")
    x = torch.randn(1, 8, 3, 3)
    with torch.inference_mode():
        expected = layer(x)
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            close(other(x), expected)
            assert other._traced_weight in pt._private_weights


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.scale = nn.Conv2d(c, c, 1)

    def forward(self, x, gate):
        y = self.bn(self.conv(x))
        y += x  # in place, as torchvision's Bottleneck does
        z = torch.relu(y)
        return nn.functional.silu(self.scale(z) + gate)  # gate broadcasts: (N, C, 1, 1)


def test_graph_fuses_residual_additions_and_functional_activations():
    model = randomize_batchnorm(ResidualBlock(16))
    converted = pt.convert(model)
    assert converted.pwcpu_report == ["bn: folded into conv", "conv: pwcpu (fused residual add, relu)",
                                      "scale: pwcpu (fused residual add, silu)"]
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    for gate in (torch.randn(2, 16, 1, 1), torch.randn(2, 16, 5, 5)):  # broadcast: PyTorch adds it
        with torch.inference_mode():
            close(converted(x, gate), model(x, gate))


def test_resnet_bottlenecks_fuse_the_residual():
    from pwcpu.torch_models import Bottleneck

    model = randomize_batchnorm(nn.Sequential(Bottleneck(64, 16, 1), Bottleneck(64, 32, 2)))
    converted = pt.convert(model)
    assert sum("residual add, relu" in line for line in converted.pwcpu_report) == 2
    x = torch.randn(1, 64, 12, 12)
    with torch.inference_mode():
        close(converted(x), model(x))


def test_trace_false_keeps_the_models_class():
    from pwcpu.torch_models import InvertedResidual

    model = randomize_batchnorm(InvertedResidual(16, 16, 1, 4))
    converted = pt.convert(model, trace=False)
    assert type(converted) is InvertedResidual and converted.use_residual
    assert isinstance(converted.conv[0], pt.PwcpuSequential)  # the expand conv_bn, fused
    x = torch.randn(1, 16, 7, 7)
    with torch.inference_mode():
        close(converted(x), model(x))
    assert isinstance(pt.convert(model), torch.fx.GraphModule)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "regnet_y_400mf",
                                  "convnext_tiny", "resnet50"])
def test_torchvision_models_convert_and_match(name):
    """torchvision's own definitions (skipped where torchvision is not installed)."""
    from pwcpu.torch_models import torchvision_models

    models = torchvision_models()
    if models is None:
        pytest.skip("torchvision is not installed")
    model = randomize_batchnorm(getattr(models, name)(weights=None))
    converted = pt.convert(model)
    assert isinstance(converted, torch.fx.GraphModule)
    assert any(": pwcpu" in line for line in converted.pwcpu_report)
    blocks = [m for m in converted.modules() if isinstance(m, pt.PwcpuInvertedResidual)]
    if name == "efficientnet_b0":  # every MBConv block fused, squeeze-excitation and residual included
        assert len(blocks) == 16 and all(b.se_reduce is not None for b in blocks) and sum(b.residual for b in blocks) == 9
        assert not any("stochastic_depth" in str(n.target) for n in converted.graph.nodes)
    if name == "mobilenet_v3_large":  # every block with an expansion fused, the 8 with a Hardsigmoid-gated SE too
        assert len(blocks) == 14 and sum(b.se_reduce is not None for b in blocks) == 8
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(converted(x), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


def test_fast_lane_follows_the_input_layout():
    """The eager fast lane opens for a shape after its first call; inputs of that shape whose
    channels are not contiguous must still take the general path."""
    layer = pt.PwcpuConv2d.from_modules(nn.Conv2d(8, 12, 1), activation="relu")
    reference = nn.Sequential(nn.Conv2d(8, 12, 1), nn.ReLU())
    reference[0].weight.data.copy_(layer.weight)
    reference[0].bias.data.copy_(layer.bias)
    x = torch.randn(2, 8, 5, 6)
    with torch.inference_mode():
        for inp in (x.contiguous(memory_format=torch.channels_last), x, x.contiguous(memory_format=torch.channels_last),
                    x.contiguous(), torch.randn(2, 8, 5, 12)[..., ::2]):
            close(layer(inp), reference(inp))
