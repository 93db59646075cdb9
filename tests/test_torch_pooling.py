"""Global average pooling in converted models: pwcpu.torch.adaptive_avg_pool_to_one and
mean_over_pixels, one pass over NHWC memory (pwcpu::channel_means)."""

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import pwcpu  # noqa: E402
import pwcpu.torch as pt  # noqa: E402


def in_layout(shape, layout):
    x = torch.randn(*shape)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channel slice":  # the second half of a wider NHWC tensor's channels
        n, c, h, w = shape
        return torch.randn(n, 2 * c + 1, h, w).contiguous(memory_format=torch.channels_last)[:, c + 1:]
    return x


@pytest.mark.parametrize("layout", ["channels_last", "channel slice", "nchw"])
@pytest.mark.parametrize("shape", [(1, 960, 7, 7), (2, 3, 1, 1), (1, 1, 5, 4), (2, 300, 9, 11), (1, 64, 112, 112),
                                   (3, 17, 2, 13), (1, 0, 3, 3), (2, 5, 0, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_global_average_pooling_is_pytorchs(layout, shape, threads):
    x = in_layout(shape, layout)
    with pwcpu.num_threads(threads):
        pooled = pt.adaptive_avg_pool_to_one(x)
        means = pt.mean_over_pixels(x, (2, 3))
        kept = pt.mean_over_pixels(x, (-1, -2), keepdim=True)
    exact = x.double().mean((2, 3), keepdim=True)
    torch.testing.assert_close(pooled.double(), exact, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert pooled.shape == F.adaptive_avg_pool2d(x, 1).shape and pooled.dtype == torch.float32
    torch.testing.assert_close(means.double(), exact[:, :, 0, 0], rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(kept, pooled, rtol=0, atol=0, equal_nan=True)


def test_large_maps_keep_their_accuracy():
    """A 224x224 map far from zero: the pixel rows are summed in float, the rows in double."""
    x = (1000.0 + torch.randn(1, 8, 224, 224)).contiguous(memory_format=torch.channels_last)
    exact = x.double().mean((2, 3))
    relative = ((pt.mean_over_pixels(x, (2, 3)).double() - exact).abs() / exact.abs()).max().item()
    assert relative < 1e-6


@pytest.mark.parametrize("how", ["float64", "autograd", "other axes", "three axes", "axes out of range"])
def test_other_calls_take_pytorchs_ops(how):
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64 if how == "float64" else torch.float32,
                    requires_grad=how == "autograd")
    if how == "other axes":
        assert torch.equal(pt.mean_over_pixels(x, (1, 2)), x.mean((1, 2)))
        return
    if how == "axes out of range":  # 6 is no axis of a 4-D tensor, though 6 % 4 == 2: PyTorch's error
        with pytest.raises(IndexError):
            pt.mean_over_pixels(x, (6, 3))
        return
    if how == "three axes":
        y = torch.randn(6, 3, 4)  # unbatched: the pool takes its last two axes
        assert torch.equal(pt.adaptive_avg_pool_to_one(y), F.adaptive_avg_pool2d(y, 1))
        assert torch.equal(pt.mean_over_pixels(y, (-2, -1)), y.mean((-2, -1)))
        return
    y = pt.adaptive_avg_pool_to_one(x)
    assert torch.equal(y, F.adaptive_avg_pool2d(x, 1))
    if how == "autograd":
        y.sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 1 / 12))


class Pools(nn.Module):
    """Every spelling of global average pooling the conversion takes, and three it must leave."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(5, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.pool2 = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        h = self.conv(x)
        taken = (self.pool(h).flatten(1), F.adaptive_avg_pool2d(h, 1).flatten(1), h.mean((2, 3)),
                 h.mean([-1, -2], keepdim=True).flatten(1), torch.mean(h, dim=(2, 3)),
                 h.mean(dim=[2, 3], keepdim=False))
        left = (self.pool2(h).flatten(1), h.mean(1).flatten(1), h.mean((1, 2)))
        return torch.cat(taken + left, 1)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_convert_pools_every_spelling_and_nothing_else(memory_format):
    torch.manual_seed(2)
    model = Pools().eval()
    converted = pt.convert(model)
    assert len([line for line in converted.pwcpu_report if "global average pooling" in line]) == 6
    targets = {n.target for n in converted.graph.nodes}
    assert pt.adaptive_avg_pool_to_one in targets and pt.mean_over_pixels in targets and "pool2" in targets
    x = torch.randn(2, 5, 6, 7).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["torch.save", "fx.symbolic_trace"])
def test_saved_and_traced_copies_keep_the_pwcpu_calls(how):
    """Loading a saved GraphModule traces its code again, as tracing the converted model does:
    the pooling functions are recorded as calls, not traced into."""
    import io

    torch.manual_seed(3)
    model = Pools().eval()
    converted = pt.convert(model)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(converted, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    else:
        copied = torch.fx.symbolic_trace(converted)
    targets = [n.target for n in copied.graph.nodes]
    assert targets.count(pt.adaptive_avg_pool_to_one) == 2 and targets.count(pt.mean_over_pixels) == 4
    x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(copied(x), converted(x), rtol=0, atol=0)


def test_only_axes_2_and_3_of_a_4d_tensor_are_pixel_axes():
    assert pt._pixel_axes((2, 3)) and pt._pixel_axes([-1, -2]) and pt._pixel_axes((3, -2))
    assert not any(pt._pixel_axes(d) for d in [(6, 3), (2, 7), (-6, 3), (1, 2), (2,), (2, 3, 1), (2.0, 3), "23", None])


def test_plain_channels_last_tensors_reach_pwcpus_kernel(monkeypatch):
    """The comparisons above test pwcpu's kernel only if plain tensors reach it: count its calls."""
    calls = []
    kernel = pt._core.channel_means
    monkeypatch.setattr(pt._core, "channel_means", lambda *args: calls.append(args) or kernel(*args))
    x = torch.randn(2, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    pt.adaptive_avg_pool_to_one(x)
    pt.mean_over_pixels(x, (2, 3))
    assert len(calls) == 2
    pt.adaptive_avg_pool_to_one(x.contiguous())  # NCHW memory: PyTorch's reduction
    pt.adaptive_avg_pool_to_one(x.clone().requires_grad_())
    assert len(calls) == 2
