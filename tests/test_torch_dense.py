"""Dense convolutions (stems, deep 3x3 layers) through the PyTorch bridge (skipped when torch is
not installed)."""

import io
import pickle

import pytest

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pwcpu.torch")
randomize_batchnorm = pytest.importorskip("pwcpu.torch_models").randomize_batchnorm
nn = torch.nn


class StemAndBasicBlock(nn.Module):
    """A stem (3 -> 16, 3x3 stride 2 + BN + ReLU6), a 64-channel 3x3 layer (left to PyTorch) and a
    ResNet basic block on 128 channels: conv3x3 + BN + ReLU, conv3x3 + BN, + the input, ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.widen = nn.Conv2d(16, 64, 1)
        self.mid = nn.Conv2d(64, 128, 3, 1, 1)
        self.conv1 = nn.Conv2d(128, 128, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(128)
        self.conv2 = nn.Conv2d(128, 128, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(128)

    def forward(self, x):
        x = self.mid(self.widen(nn.functional.relu6(self.stem_bn(self.stem(x)))))
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


@pytest.mark.parametrize("channels_last", [True, False])
def test_convert_runs_stems_and_deep_layers_on_pwcpu_torch(channels_last):
    model = randomize_batchnorm(StemAndBasicBlock())
    converted = pt.convert(model, channels_last=channels_last)
    kinds = {name: type(m).__name__ for name, m in converted.named_children()}
    assert kinds["stem"] == kinds["conv1"] == kinds["conv2"] == "PwcpuDenseConv2d"
    assert kinds["mid"] == "Conv2d"  # 64 input channels: PyTorch's direct convolution is as fast
    report = converted.pwcpu_report
    assert "stem: pwcpu (fused relu6)" in report and "conv1: pwcpu (fused relu)" in report
    assert "conv2: pwcpu (fused residual add, relu)" in report
    x = torch.randn(2, 3, 21, 18)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


def test_module_state_pickle_and_autograd_torch():
    conv = nn.Conv2d(3, 8, (3, 5), (2, 1), (1, 2))
    layer = pt.PwcpuDenseConv2d.from_module(conv, "silu")
    assert layer.weight.shape == (8, 3, 3, 5)
    layer.weight.zero_()  # a copy: the layer is unchanged
    x, r = torch.randn(2, 3, 9, 11), torch.randn(2, 8, 5, 11)
    expected = nn.functional.silu(conv(x) + r).detach()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, r), expected)
    clone = pickle.loads(pickle.dumps(layer))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    other = pt.PwcpuDenseConv2d(torch.zeros(8, 3, 3, 5), torch.zeros(8), (2, 1), (1, 2), "silu")
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    with torch.inference_mode():
        torch.testing.assert_close(clone(x, r), expected)
        torch.testing.assert_close(other(x, r), expected)
        # A residual that broadcasts is PyTorch's to add.
        torch.testing.assert_close(layer(x, r[:1]), nn.functional.silu(conv(x) + r[:1]))
    # With gradients wanted, PyTorch computes (same weights), so backward works.
    xg = x.clone().requires_grad_()
    y = layer(xg, r)
    y.sum().backward()
    assert xg.grad is not None and y.grad_fn is not None
    torch.testing.assert_close(y.detach(), expected)


def test_operator_checks_apply_torch():
    layer = pt.PwcpuDenseConv2d(torch.ones(4, 2, 3, 3), None, 1, 1)
    with torch.inference_mode():
        with pytest.raises(TypeError, match="float32"):
            layer(torch.ones(1, 2, 5, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="channels"):
            layer(torch.ones(1, 3, 5, 5))


@pytest.mark.parametrize("kind", ["dense", "depthwise"])
def test_repeated_shapes_take_the_fast_lane_and_agree_torch(kind):
    """The second call of a shape goes straight to the kernels with the remembered output
    geometry; new shapes, contiguous (not channels_last) inputs and residuals still agree."""
    torch.manual_seed(0)
    if kind == "dense":
        conv = nn.Conv2d(8, 12, 3, 2, 1).eval()
        layer = pt.PwcpuDenseConv2d.from_module(conv, "relu")
    else:
        conv = nn.Conv2d(8, 8, 3, 2, 1, groups=8).eval()
        layer = pt.PwcpuDepthwiseConv2d.from_module(conv, "relu")
    with torch.inference_mode():
        for shape in [(1, 8, 9, 9), (1, 8, 9, 9), (2, 8, 5, 7), (1, 8, 9, 9), (2, 8, 5, 7)]:
            for channels_last in (True, False):
                x = torch.randn(shape)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = layer(x)
                assert y.shape == torch.relu(conv(x)).shape and y.is_contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(y, torch.relu(conv(x)), rtol=1e-5, atol=1e-5)
        if kind == "dense":
            r = torch.randn(1, 12, 5, 5)
            torch.testing.assert_close(layer(torch.randn(1, 8, 9, 9), r).shape, r.shape)
