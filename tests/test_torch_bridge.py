"""pwcpu.torch: the custom operator, PwcpuConv2d and convert() on MobileNetV2 and ResNet blocks."""

import warnings

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import pwcpu  # noqa: E402
import pwcpu.torch as pt  # noqa: E402
from pwcpu.torch_models import Bottleneck, InvertedResidual, conv_bn, randomize_batchnorm  # noqa: E402


def small_mobilenet():
    return randomize_batchnorm(nn.Sequential(conv_bn(3, 32, 3, 2), InvertedResidual(32, 16, 1, 1),
                                             InvertedResidual(16, 24, 2, 6), InvertedResidual(24, 24, 1, 6),
                                             conv_bn(24, 128)))


def small_resnet():
    return randomize_batchnorm(nn.Sequential(Bottleneck(64, 32, 1), Bottleneck(128, 32, 2)))


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("build", [small_mobilenet, small_resnet])
def test_converted_blocks_match(build, channels_last):
    model = build()
    converted = pt.convert(model)
    x = torch.randn(2, model[0][0].in_channels if isinstance(model[0], nn.Sequential) else 64, 24, 24)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, got = model(x), converted(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert any("pwcpu" in line for line in converted.pwcpu_report)
    replaced = [m for m in converted.modules() if isinstance(m, pt.PwcpuConv2d)]
    pointwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(replaced) == len(pointwise)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in converted.modules())


def test_convert_fuses_bn_and_activation_and_leaves_the_original_alone():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.SiLU(), nn.Conv2d(16, 4, 3)))
    converted = pt.convert(model)
    assert isinstance(converted, torch.fx.GraphModule)
    fused = converted.get_submodule("0")
    assert isinstance(fused, pt.PwcpuConv2d) and fused.activation == "silu"
    assert isinstance(converted.get_submodule("3"), nn.Conv2d)
    assert isinstance(model[0], nn.Conv2d)  # the original is untouched
    assert converted.pwcpu_report == ["1: folded into 0", "0: pwcpu (fused silu)"]
    x = torch.randn(1, 8, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


class Untraceable(nn.Sequential):
    """A Sequential whose forward branches on data: torch.fx cannot trace it."""

    def forward(self, x):
        return super().forward(x) if bool(x.sum() > -1e30) else x


def test_untraceable_models_convert_module_by_module():
    inner = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.SiLU(), nn.Conv2d(16, 4, 3))
    model = randomize_batchnorm(Untraceable(inner))
    converted = pt.convert(model)
    seq = converted[0]
    assert isinstance(seq, pt.PwcpuSequential) and seq._runs == {0: 3}
    assert isinstance(seq[0], pt.PwcpuConv2d) and seq[0].activation is None  # unfused, one by one
    assert isinstance(seq[1], pt.PwcpuBatchNorm2d) and isinstance(seq[2], nn.SiLU)
    assert converted.pwcpu_report == ["0.0: pwcpu (fused 1, 2)"]
    x = torch.randn(1, 8, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)
        fused = seq._fused[0][1]
        assert isinstance(fused, pt.PwcpuConv2d) and fused.activation == "silu"
        # Children called one by one compute what the original children computed.
        torch.testing.assert_close(seq[1](seq[0](x)), inner[1](inner[0](x)), rtol=1e-4, atol=1e-4)


def test_ineligible_convs_are_reported():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1).double())
    with pytest.warns(pt.PwcpuConversionWarning, match="padding_mode='reflect'"):
        converted = pt.convert(model)
    assert isinstance(converted.get_submodule("0"), nn.Conv2d) and isinstance(converted.get_submodule("1"), nn.Conv2d)
    assert len(converted.pwcpu_report) == 2 and all("left to PyTorch" in r for r in converted.pwcpu_report)


def test_channels_last_input_is_not_copied():
    x = torch.randn(1, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(48, 32, 1, 1)
    y = torch.ops.pwcpu.conv1x1(x, weight, None, [1, 1], [0, 0], 1, "relu", None)
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = torch.relu(torch.nn.functional.conv2d(x, weight))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_converted_layers_write_into_the_last_freed_output_buffers():
    """A converted model's results live in pwcpu's output buffers: once a call's outputs are freed,
    the next call's layers are given the same blocks back (warm in cache, no fresh pages) rather
    than torch.empty's memory, and compute the same values."""
    model = small_resnet().eval()
    x = torch.randn(1, 64, 20, 20)
    with torch.inference_mode():
        converted = pt.convert(model)
        expected = model(x)
        torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-4)
        reused = pwcpu.runtime_info()["reused_output_buffers"]
        for _ in range(3):
            torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-4)
        # Each of the six layers' outputs, every call (more than one size among them).
        assert pwcpu.runtime_info()["reused_output_buffers"] >= reused + 3 * 6
        y = converted(x)
        held = y.data_ptr()
        z = converted(x)  # y is still held: its memory is not handed out again
        assert z.data_ptr() != held
        torch.testing.assert_close(y, z)


def test_residual_through_the_operator():
    x, r = torch.randn(2, 16, 5, 5), torch.randn(2, 24, 5, 5)
    weight, bias = torch.randn(24, 16, 1, 1), torch.randn(24)
    y = torch.ops.pwcpu.conv1x1(x, weight, bias, [1, 1], [0, 0], 1, None, r)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, weight, bias) + r, rtol=1e-4, atol=1e-4)


def test_operator_survives_export_and_compile():
    model = pt.convert(randomize_batchnorm(nn.Sequential(conv_bn(16, 32), nn.Conv2d(32, 8, 1))))
    x = torch.randn(1, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
    exported = torch.export.export(model, (x,))
    assert "pwcpu.conv1x1" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's own notices
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)


def test_importing_pwcpu_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pwcpu; pwcpu.conv1x1; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_full_networks(name):
    import pwcpu.torch_models as models

    model = models.randomize_batchnorm(getattr(models, name)())
    converted = pt.convert(model)
    x = torch.randn(1, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, got = model(x), converted(x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
