"""pwcpu.torch.PwcpuChain: straight runs of converted layers, run through two reused buffers."""

import copy
import io
import threading

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import pwcpu.torch as pt  # noqa: E402
from pwcpu.torch_models import InvertedResidual, conv_bn, randomize_batchnorm  # noqa: E402


def straight_model(seed=0):
    """A stem, inverted residual blocks (one adding its input) and a last 1x1: one straight run
    of converted layers, then pooling and a classifier that stay outside it."""
    torch.manual_seed(seed)
    return randomize_batchnorm(nn.Sequential(
        conv_bn(3, 16, 3, 2), InvertedResidual(16, 24, 2, 6), InvertedResidual(24, 24, 1, 6), conv_bn(24, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), seed=seed)


def chain_of(converted):
    chains = [m for m in converted.modules() if isinstance(m, pt.PwcpuChain)]
    assert len(chains) == 1
    return chains[0]


def one_by_one(converted, x):
    """What the converted model computes with its chain calling the layers in turn."""
    chain = chain_of(converted)
    chain.forward = chain._one_by_one
    try:
        with torch.inference_mode():
            return converted(x)
    finally:
        del chain.forward


def channels_last(*shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def test_a_straight_run_becomes_one_chain_computing_what_its_layers_compute():
    model = straight_model()
    converted = pt.convert(model)
    chain = chain_of(converted)
    assert chain.layer_names == ("0.0", "1.conv.0.0_block", "2.conv.0.0_block", "3.0")
    assert [type(layer) for layer in chain._layers] == [pt.PwcpuDenseConv2d, pt.PwcpuInvertedResidual,
                                                        pt.PwcpuInvertedResidual, pt.PwcpuConv2d]
    assert any("one pwcpu_chain_0 of 4 layers" in line for line in converted.pwcpu_report)
    x = channels_last(2, 3, 40, 36)
    expected = one_by_one(converted, x)
    with torch.inference_mode():
        results = [converted(x) for _ in range(3)]  # the first call makes the run, the others take it
        torch.testing.assert_close(results[0], model(x), rtol=1e-4, atol=1e-4)
    assert x.shape in chain._runs
    for y in results:
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_returned_outputs_are_never_reused():
    converted = pt.convert(nn.Sequential(*list(straight_model())[:4]))  # the chain's output is the model's
    x1, x2 = channels_last(1, 3, 32, 32), channels_last(1, 3, 32, 32)
    with torch.inference_mode():
        converted(x1)
        y1 = converted(x1)
        kept = y1.clone()
        y2 = converted(x2)
    assert y1.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y1, kept, rtol=0, atol=0)
    torch.testing.assert_close(y2, one_by_one(converted, x2), rtol=0, atol=0)


def test_input_shapes_alternate():
    converted = pt.convert(straight_model())
    inputs = [channels_last(1, 3, 32, 32), channels_last(2, 3, 48, 40), channels_last(1, 3, 17, 23)]
    expected = [one_by_one(converted, x) for x in inputs]
    with torch.inference_mode():
        for _ in range(3):
            for x, y in zip(inputs, expected):
                torch.testing.assert_close(converted(x), y, rtol=0, atol=0)
    assert len(chain_of(converted)._runs) == 3


def test_new_weights_reach_the_chain():
    converted = pt.convert(straight_model(seed=0))
    x = channels_last(1, 3, 32, 32)
    with torch.inference_mode():
        before = [converted(x) for _ in range(2)][-1]
    other = straight_model(seed=1)
    converted.load_state_dict(pt.convert(other).state_dict())
    with torch.inference_mode():
        after = [converted(x) for _ in range(2)]
        expected = other(x)
    assert not torch.allclose(before, expected, rtol=1e-3, atol=1e-3)
    for y in after:
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_the_chain_keeps_the_layers_names_and_state():
    model = straight_model()
    converted = pt.convert(model)
    names = set(converted.state_dict())
    assert not any(name.startswith("pwcpu_chain") for name in names)
    for layer_name in chain_of(converted).layer_names:
        assert any(name.startswith(layer_name + ".") for name in names)
    converted.load_state_dict(converted.state_dict(), strict=True)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_have_their_own_chain_over_their_own_layers(how):
    converted = pt.convert(straight_model())
    x = channels_last(1, 3, 32, 32)
    with torch.inference_mode():
        expected = [converted(x) for _ in range(2)][-1]
    if how == "deepcopy":
        copied = copy.deepcopy(converted)
    else:
        buffer = io.BytesIO()
        torch.save(converted, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    chain = chain_of(copied)
    for name, layer in zip(chain.layer_names, chain._layers):
        assert layer is copied.get_submodule(name)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)


def test_concurrent_calls_do_not_share_buffers():
    converted = pt.convert(straight_model())
    inputs = [channels_last(1, 3, 40, 40) for _ in range(4)]
    expected = [one_by_one(converted, x) for x in inputs]
    failures = []

    def call(i):
        with torch.inference_mode():
            for _ in range(25):
                if not torch.equal(converted(inputs[i]), expected[i]):
                    failures.append(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_plain_nchw_input_runs_in_the_buffers():
    model = straight_model()
    converted = pt.convert(model)
    chain = chain_of(converted)
    x = torch.randn(2, 3, 40, 36)  # NCHW-contiguous, as a model's input usually is: the stem reads a copy
    expected = one_by_one(converted, x)
    with torch.inference_mode():
        converted(x)  # makes the run
        chain._one_by_one = None  # a call that left the buffers would fail
        try:
            y = converted(x)
        finally:
            del chain._one_by_one
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_other_inputs_take_the_layers_own_paths():
    model = straight_model()
    converted = pt.convert(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)
    grad_input = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference module"):
        converted(grad_input)
