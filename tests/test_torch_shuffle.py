"""ShuffleNet's channel shuffle in a converted model: computed on NHWC memory by
pwcpu.torch.channel_shuffle, with the concatenation before it."""

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import pwcpu.torch as pt  # noqa: E402
from pwcpu.torch_models import randomize_batchnorm  # noqa: E402


def reference_shuffle(x, groups):
    """torchvision.models.shufflenetv2.channel_shuffle, as written there."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


def branch(c_in, c_out, stride):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, stride, 1, groups=c_out, bias=False), nn.BatchNorm2d(c_out),
        nn.Conv2d(c_out, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ShuffleBlock(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual: two branches at stride 2, else half the
    channels pass through; then the halves are concatenated and shuffled."""

    def __init__(self, c_in, c_out, stride, groups=2):
        super().__init__()
        self.stride, self.groups = stride, groups
        half = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.branch2 = branch(c_in if stride > 1 else half, half, stride)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return reference_shuffle(out, self.groups)


def shufflenet_like(seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(nn.Sequential(
        nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True),
        ShuffleBlock(24, 58, 2), ShuffleBlock(58, 58, 1), ShuffleBlock(58, 58, 1),
        ShuffleBlock(58, 116, 2), ShuffleBlock(116, 116, 1),
        nn.Conv2d(116, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), seed=seed).eval()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_shufflenet_like_model_shuffles_in_nhwc_and_matches(memory_format):
    model = shufflenet_like()
    converted = pt.convert(model)
    shuffles = [line for line in converted.pwcpu_report if "channel shuffle" in line]
    assert len(shuffles) == 5 and all("with the concatenation before it" in line for line in shuffles)
    graph = converted.graph
    assert not any(n.op == "call_method" and n.target in ("transpose", "contiguous") for n in graph.nodes)
    assert not any(n.op == "call_function" and n.target in (torch.cat, torch.transpose) for n in graph.nodes)
    x = torch.randn(2, 3, 40, 36).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        expected = model(x)
        for _ in range(2):  # the second call runs the chains in their buffers
            torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)


def test_shuffled_halves_reach_the_next_layers_as_nhwc_views():
    """The shuffle's output is channels_last, so ShuffleNet's chunk gives channel slices of NHWC
    memory, which the next chain reads where they lie (no NCHW tensor between the blocks)."""
    a, b = (torch.randn(1, 6, 5, 7).contiguous(memory_format=torch.channels_last) for _ in range(2))
    y = pt.channel_shuffle((a, b), 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x1, x2 = y.chunk(2, dim=1)
    assert x2.stride() == (5 * 7 * 12, 1, 7 * 12, 12)


def parts_in(layout, shapes):
    parts = [torch.randn(*s) for s in shapes]
    if layout == "channels_last":
        return [p.contiguous(memory_format=torch.channels_last) for p in parts]
    if layout == "channel slices":  # halves of a wider NHWC tensor, as ShuffleNet's chunk gives
        return [torch.randn(s[0], 2 * s[1], s[2], s[3]).contiguous(memory_format=torch.channels_last)[:, s[1]:]
                for s in shapes]
    return parts


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel slices"])
@pytest.mark.parametrize("shapes, groups", [
    ([(2, 5, 3, 4)] * 2, 2),                       # equal halves: interleaved, no concatenation
    ([(2, 40, 30, 30)] * 2, 2),                     # large enough to be split among threads
    ([(1, 3, 7, 1)] * 3, 3),
    ([(1, 1, 2, 2)] * 4, 4),                        # one channel a group
    ([(2, 6, 3, 4)], 2), ([(1, 12, 5, 5)], 3),      # a tensor alone
    ([(2, 4, 3, 3), (2, 8, 3, 3)], 2),              # unequal parts: concatenated, then shuffled
    ([(1, 3, 2, 2), (1, 3, 2, 2)], 3),              # equal parts, but not one a group
    ([(1, 7, 2, 3)], 1),
])
def test_channel_shuffle_is_torchvisions(layout, shapes, groups):
    parts = parts_in(layout, shapes)
    expected = reference_shuffle(torch.cat(parts, 1), groups)
    y = pt.channel_shuffle(parts, groups)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, expected)


def test_channels_that_do_not_split_into_the_groups_are_a_value_error():
    with pytest.raises(ValueError, match="7 channels do not split into 2 groups"):
        pt.channel_shuffle((torch.randn(1, 7, 2, 2),), 2)


class CatUsedTwice(nn.Module):
    """The concatenation has a second use: it must still be made, and the shuffle reads it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        out = torch.cat((self.a(x), self.b(x)), dim=1)
        return reference_shuffle(out, 2) + out


class NotAShuffle(nn.Module):
    """The same steps, but the transpose swaps other axes: left as traced."""

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w)
        x = torch.transpose(x, 2, 3).contiguous()
        return x.view(n, c, h, w)


def test_other_graphs_keep_their_meaning():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 5)
    twice = CatUsedTwice().eval()
    converted = pt.convert(twice)
    assert [line for line in converted.pwcpu_report if "channel shuffle" in line] \
        == ["view_1: channel shuffle (2 groups) in NHWC, one pass"]
    assert any(n.target is torch.cat for n in converted.graph.nodes)
    other = NotAShuffle()
    converted_other = pt.convert(other)
    assert not any("channel shuffle" in line for line in converted_other.pwcpu_report)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), twice(x), rtol=1e-5, atol=1e-6)
        y = torch.randn(2, 4, 6, 6)
        assert torch.equal(converted_other(y), other(y))


@pytest.mark.parametrize("how", ["float64", "autograd"])
def test_calls_outside_pwcpus_kernel_take_pytorchs_ops(how):
    """Other dtypes and calls that record gradients are computed by PyTorch's operators."""
    dtype = torch.float64 if how == "float64" else torch.float32
    parts = [torch.randn(2, 3, 4, 5, dtype=dtype, requires_grad=how == "autograd") for _ in range(2)]
    twins = [p.detach().clone().requires_grad_(p.requires_grad) for p in parts]
    y, expected = pt.channel_shuffle(parts, 2), reference_shuffle(torch.cat(twins, 1), 2)
    assert torch.equal(y, expected)
    if how == "autograd":
        weights = torch.randn(y.shape)
        (y * weights).sum().backward()
        (expected * weights).sum().backward()
        for part, twin in zip(parts, twins):
            assert torch.equal(part.grad, twin.grad)


def test_a_saved_copy_keeps_its_shuffles():
    import io

    converted = pt.convert(shufflenet_like())
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    copied = torch.load(buffer, weights_only=False)
    assert [n.target for n in copied.graph.nodes].count(pt.channel_shuffle) == 5
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(copied(x), converted(x), rtol=0, atol=0)


def test_plain_equal_parts_reach_pwcpus_kernel(monkeypatch):
    """The comparisons above test pwcpu's kernel only if plain tensors reach it: count its calls."""
    calls = []
    kernel = pt._core.interleave_channels
    monkeypatch.setattr(pt._core, "interleave_channels", lambda *args: calls.append(args) or kernel(*args))
    parts = [torch.randn(1, 4, 3, 3) for _ in range(2)]
    pt.channel_shuffle(parts, 2)
    assert len(calls) == 1
    pt.channel_shuffle([p.clone().requires_grad_() for p in parts], 2)
    pt.channel_shuffle(parts, 1)  # not one part a group: concatenated, then shuffled by PyTorch
    assert len(calls) == 1
