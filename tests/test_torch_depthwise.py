"""Depthwise convolutions through the PyTorch bridge (skipped when torch is not installed)."""

import io
import pickle

import numpy as np
import pytest

import pwcpu

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pwcpu.torch")
nn = torch.nn


class SeparableBlock(nn.Module):
    """MobileNet's pattern: depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN, and a 5x5 depthwise."""

    def __init__(self, c=24, k=40, stride=2):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c, k, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(k)
        self.dw5 = nn.Conv2d(k, k, 5, 1, 2, groups=k)

    def forward(self, x):
        return torch.nn.functional.silu(self.dw5(self.bn2(self.pw(self.act(self.bn1(self.dw(x)))))))


def randomized(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("channels_last", [True, False])
def test_convert_runs_depthwise_layers_on_pwcpu_torch(channels_last):
    model = randomized(SeparableBlock())
    converted = pt.convert(model, channels_last=channels_last)
    kinds = {name: type(m).__name__ for name, m in converted.named_children()}
    assert kinds["dw"] == "PwcpuDepthwiseConv2d" and kinds["dw5"] == "PwcpuDepthwiseConv2d"
    assert "dw: pwcpu (fused relu6)" in converted.pwcpu_report
    assert "dw5: pwcpu (fused silu)" in converted.pwcpu_report
    x = torch.randn(2, 24, 15, 17)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


def test_dilated_depthwise_is_left_to_pytorch_torch():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)).eval()
    with pytest.warns(pt.PwcpuConversionWarning, match="dilation"):
        converted = pt.convert(model)
    x = torch.randn(1, 8, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x))


def test_module_state_pickle_and_autograd_torch():
    conv = nn.Conv2d(6, 6, (3, 5), (1, 2), (1, 2), groups=6)
    layer = pt.PwcpuDepthwiseConv2d.from_module(conv, "relu")
    assert layer.weight.shape == (6, 1, 3, 5)
    layer.weight.zero_()  # a copy: the layer is unchanged
    x = torch.randn(2, 6, 7, 11)
    expected = torch.relu(conv(x)).detach()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected)
    clone = pickle.loads(pickle.dumps(layer))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    other = pt.PwcpuDepthwiseConv2d(torch.zeros(6, 1, 3, 5), torch.zeros(6), (1, 2), (1, 2), "relu")
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    with torch.inference_mode():
        torch.testing.assert_close(clone(x), expected)
        torch.testing.assert_close(other(x), expected)
    # With gradients wanted, PyTorch computes (same weights), so backward works.
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.sum().backward()
    assert xg.grad is not None and y.grad_fn is not None
    torch.testing.assert_close(y.detach(), expected)


def test_operator_checks_apply_torch():
    layer = pt.PwcpuDepthwiseConv2d(torch.ones(4, 1, 3, 3), None, 1, 1)
    with torch.inference_mode():
        with pytest.raises(TypeError, match="float32"):
            layer(torch.ones(1, 4, 5, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="channels"):
            layer(torch.ones(1, 3, 5, 5))
    assert pwcpu.DepthwiseConv(np.ones((4, 3, 3), np.float32)).channels == 4


class InvertedResidualBlock(nn.Module):
    """torchvision's MobileNetV2 block, written out: expand, depthwise, project (+ input)."""

    def __init__(self, c=16, e=64, k=16, stride=1):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, stride, 1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(e, k, 1, bias=False), nn.BatchNorm2d(k))
        self.use_residual = stride == 1 and c == k

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.use_residual else y


@pytest.mark.parametrize("stride,k", [(1, 16), (2, 24)])
def test_convert_fuses_inverted_residual_blocks_torch(stride, k):
    model = randomized(nn.Sequential(InvertedResidualBlock(16, 64, k, stride), nn.ReLU()))
    converted = pt.convert(model)
    fused = [m for m in converted.modules() if isinstance(m, pt.PwcpuInvertedResidual)]
    assert len(fused) == 1 and fused[0].residual == (stride == 1)
    assert any("one fused pwcpu InvertedResidual" in line for line in converted.pwcpu_report)
    x = torch.randn(2, 16, 13, 11).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)
    # Like the converted 1x1 layers, the block computes no gradients: a clear error.
    with pytest.raises(RuntimeError, match="inference module"):
        converted(x.clone().requires_grad_())
    # New weights in a part reach the fused call (the ReLU after the block is fused into project).
    block = fused[0]
    assert block.project.activation == "relu"
    block.project.weight = torch.zeros_like(block.project.weight)
    with torch.inference_mode():
        y = block(x)
        expected = torch.relu(block.project.bias.reshape(1, -1, 1, 1) + (x if stride == 1 else 0)).expand_as(y)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


class SqueezeExcitation(nn.Module):
    """torchvision's: global average pooling, 1x1 reduce + activation, 1x1 expand + gate, times the input."""

    def __init__(self, e, s, activation=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.activation = nn.Conv2d(e, s, 1), activation()
        self.fc2, self.scale_activation = nn.Conv2d(s, e, 1), gate()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConvBlock(nn.Module):
    """EfficientNet's block, written out: [expand,] depthwise, squeeze-excitation, project (+ input)."""

    def __init__(self, c=16, e=64, k=16, kernel=3, stride=1, se_activation=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        layers = [] if e == c else [nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.SiLU()]
        layers += [nn.Conv2d(e, e, kernel, stride, kernel // 2, groups=e, bias=False), nn.BatchNorm2d(e), nn.SiLU(),
                   SqueezeExcitation(e, max(1, c // 4), se_activation, gate), nn.Conv2d(e, k, 1, bias=False),
                   nn.BatchNorm2d(k)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c == k

    def forward(self, x):
        y = self.block(x)
        if self.use_residual:
            y += x
        return y


@pytest.mark.parametrize("c,e,k,kernel,stride,se_activation,gate", [
    (16, 16, 8, 3, 1, nn.SiLU, nn.Sigmoid), (16, 64, 16, 3, 1, nn.SiLU, nn.Sigmoid),
    (16, 96, 24, 5, 2, nn.ReLU, nn.Hardsigmoid), (24, 144, 24, 5, 1, nn.SiLU, nn.Sigmoid)])
def test_convert_fuses_squeeze_excitation_blocks(c, e, k, kernel, stride, se_activation, gate):
    """EfficientNet's blocks, and MobileNetV3's squeeze-excitation (ReLU, then Hardsigmoid as the gate)."""
    model = randomized(nn.Sequential(MBConvBlock(c, e, k, kernel, stride, se_activation, gate), MBConvBlock(k, 4 * k, k)))
    converted = pt.convert(model)
    fused = [m for m in converted.modules() if isinstance(m, pt.PwcpuInvertedResidual)]
    assert len(fused) == 2 and all(m.se_reduce is not None for m in fused)
    assert (fused[0].expand is None) == (e == c) and fused[0].residual == (stride == 1 and c == k) and fused[1].residual
    assert sum("(squeeze-excitation" in line for line in converted.pwcpu_report) == 2
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in converted.modules())
    x = torch.randn(2, c, 19, 17).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)
        # Under torch.compile / export the block computes layer by layer: the same result.
        torch.testing.assert_close(fused[0]._layer_by_layer(x), fused[0](x), rtol=1e-4, atol=1e-5)
    # New weights in the excitation reach the fused call: a zero expand leaves the gate at sigmoid(bias).
    block = fused[1]
    block.se_expand.weight = torch.zeros_like(block.se_expand.weight)
    block.se_expand.bias = torch.full_like(block.se_expand.bias, -50.0)  # the gate closes: only bias + input
    h = torch.randn(1, k, 9, 9).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(block(h), block.project.bias.reshape(1, -1, 1, 1) + h, rtol=1e-5, atol=1e-5)


class NotAnExcitation(nn.Module):
    """Shapes like a squeeze-excitation that are not one: the pooled value also leaves the block,
    and the product is not with the depthwise output."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        h = torch.relu(self.dw(x))
        pooled = self.pool(h)
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))
        return self.project(scale * x), pooled


def test_convert_leaves_lookalikes_unfused():
    model = randomized(NotAnExcitation())
    converted = pt.convert(model)
    assert not any(isinstance(m, pt.PwcpuInvertedResidual) for m in converted.modules())
    x = torch.randn(1, 16, 8, 8)
    with torch.inference_mode():
        for got, want in zip(converted(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
