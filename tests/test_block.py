"""BatchNorm folding and PointwiseConvBlock (conv -> BN -> activation) against float64 math."""

import numpy as np
import pytest

import pwcpu
from pwcpu import reference
from helpers import assert_within, conv_bound, randn


def random_state(rng, k, cg):
    return {
        "conv.weight": randn(rng, k, cg, 1, 1),
        "bn.weight": rng.uniform(0.5, 1.5, k).astype(np.float32),
        "bn.bias": randn(rng, k),
        "bn.running_mean": randn(rng, k),
        "bn.running_var": rng.uniform(0.2, 2.0, k).astype(np.float32),
    }


def conv_bn_reference(x, state, eps, activation, **geometry):
    """conv (no bias) -> BatchNorm -> activation, in float64, unfolded."""
    z = reference.conv1x1(x, state["conv.weight"][:, :, 0, 0], **geometry)
    scale = state["bn.weight"].astype(np.float64) / np.sqrt(state["bn.running_var"].astype(np.float64) + eps)
    z = (z - state["bn.running_mean"]) * scale + state["bn.bias"]
    return reference.ACTIVATION_FUNCTIONS[activation](z)


def test_fold_batchnorm_matches_unfolded(rng):
    state = random_state(rng, 12, 7)
    x, bias = randn(rng, 2, 3, 4, 7), randn(rng, 12)
    w, b = pwcpu.fold_batchnorm(state["conv.weight"], bias, state["bn.weight"], state["bn.bias"],
                                state["bn.running_mean"], state["bn.running_var"], 1e-3)
    assert w.shape == (12, 7, 1, 1) and w.dtype == np.float32 and b.dtype == np.float32
    z = reference.conv1x1(x, state["conv.weight"][:, :, 0, 0], bias)
    scale = state["bn.weight"] / np.sqrt(state["bn.running_var"].astype(np.float64) + 1e-3)
    expected = (z - state["bn.running_mean"]) * scale + state["bn.bias"]
    np.testing.assert_allclose(reference.conv1x1(x, w[:, :, 0, 0], b), expected, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_errors():
    ones = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="gamma must have shape"):
        pwcpu.fold_batchnorm(np.ones((4, 3)), None, np.ones(5), ones, ones, ones)
    with pytest.raises(ValueError, match="weight must have shape"):
        pwcpu.fold_batchnorm(np.ones((4, 3, 3, 3)), None, ones, ones, ones, ones)
    with pytest.raises(ValueError, match="var \\+ eps must be positive"):
        pwcpu.fold_batchnorm(np.ones((4, 3)), None, ones, ones, ones, -ones, eps=0.0)
    with pytest.raises(TypeError, match="beta must be a real numeric array"):
        pwcpu.fold_batchnorm(np.ones((4, 3)), None, ones, ["a"] * 4, ones, ones)


@pytest.mark.parametrize("activation", ["relu", "relu6", "silu", "hardswish", None])
@pytest.mark.parametrize("stride,padding,groups", [(1, 0, 1), (2, 1, 1), (1, 0, 4)])
def test_block_matches_conv_bn_activation(isa, rng, activation, stride, padding, groups):
    c, k = 32, 48
    block = pwcpu.PointwiseConvBlock(c, k, stride=stride, padding=padding, groups=groups, activation=activation,
                                     eps=1e-3)
    state = random_state(rng, k, c // groups)
    block.load_state_dict(state)
    x = randn(rng, 2, 9, 8, c)
    y = block(x)
    expected = conv_bn_reference(x, state, 1e-3, activation, stride=stride, padding=padding, groups=groups)
    # The folded layer is an ordinary pwcpu convolution: its bound applies, widened for the fold's rounding.
    _, tolerance = conv_bound(x, block.layer.weight, block.layer.bias, stride=stride, padding=padding,
                              groups=groups, activation=activation)
    magnitude = reference.conv1x1(np.abs(x), np.abs(block.layer.weight), np.abs(block.layer.bias), stride=stride,
                                  padding=padding, groups=groups)
    assert_within(y, expected, 2 * tolerance + 4e-7 * magnitude)


def test_state_dict_round_trip_and_errors(rng):
    block = pwcpu.PointwiseConvBlock(8, 6, activation="relu6")
    state = random_state(rng, 6, 8)
    block.load_state_dict({**state, "bn.num_batches_tracked": np.array(10)})
    saved = block.state_dict()
    assert set(saved) == set(state)
    for key in state:
        np.testing.assert_array_equal(saved[key], state[key])
    with pytest.raises(ValueError, match=r"missing keys \['bn.running_var'\]"):
        block.load_state_dict({k: v for k, v in state.items() if k != "bn.running_var"})
    with pytest.raises(ValueError, match=r"unexpected keys \['bn.extra'\]"):
        block.load_state_dict({**state, "bn.extra": np.ones(6)})
    with pytest.raises(ValueError, match=r"conv.weight must have shape \(6, 8, 1, 1\)"):
        block.load_state_dict({**state, "conv.weight": np.ones((6, 8))})
    with pytest.raises(ValueError, match="groups=3 must divide"):
        pwcpu.PointwiseConvBlock(8, 6, groups=3)


def test_block_loads_a_pytorch_state_dict(rng):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential()
    module.add_module("conv", torch.nn.Conv2d(24, 40, 1, bias=False))
    module.add_module("bn", torch.nn.BatchNorm2d(40))
    module.add_module("act", torch.nn.ReLU6())
    with torch.no_grad():
        module.bn.running_mean.normal_()
        module.bn.running_var.uniform_(0.5, 2.0)
        module.bn.weight.uniform_(0.5, 1.5)
        module.bn.bias.normal_()
    module.eval()
    block = pwcpu.PointwiseConvBlock(24, 40, activation="relu6")
    block.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    x = randn(rng, 1, 7, 7, 24)
    with torch.inference_mode():
        expected = module(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(block(x), expected, rtol=1e-4, atol=1e-4)


def test_failed_load_changes_nothing(rng):
    block = pwcpu.PointwiseConvBlock(8, 6, activation=None)
    state = random_state(rng, 6, 8)
    block.load_state_dict(state)
    x = randn(rng, 1, 3, 3, 8)
    before_y, before_state = block(x), block.state_dict()
    bad = {**random_state(rng, 6, 8), "bn.running_var": -np.ones(6, np.float32)}
    with pytest.raises(ValueError, match="var \\+ eps must be positive"):
        block.load_state_dict(bad)
    np.testing.assert_array_equal(block(x), before_y)
    for key, value in block.state_dict().items():
        np.testing.assert_array_equal(value, before_state[key])


def test_float64_state_beyond_float32_is_an_error(rng):
    block = pwcpu.PointwiseConvBlock(8, 6)
    state = {key: value.astype(np.float64) for key, value in random_state(rng, 6, 8).items()}
    block.load_state_dict(state)  # float64 within range: rounded to float32
    state["bn.running_mean"][2] = 1e300
    with pytest.raises(ValueError, match="bn.running_mean has values beyond float32's range"):
        block.load_state_dict(state)


def test_torch_sequential_state_dict_with_conv_bias(rng):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 1, bias=True), torch.nn.BatchNorm2d(24), torch.nn.SiLU())
    with torch.no_grad():
        module[1].running_mean.normal_()
        module[1].running_var.uniform_(0.5, 2.0)
    module.eval()
    block = pwcpu.PointwiseConvBlock(16, 24, activation="silu")
    block.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})  # keys 0.weight, 1.bias, ...
    assert "conv.bias" in block.state_dict()
    x = randn(rng, 1, 5, 5, 16)
    with torch.inference_mode():
        expected = module(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(block(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eps", [np.float32(1e-3), np.float64(1e-3), 1e-3, 0])
def test_eps_types_are_accepted_alike(eps):
    ones = np.ones(4, np.float32)
    pwcpu.fold_batchnorm(np.ones((4, 3)), None, ones, ones, ones, ones, eps=eps)
    pwcpu.PointwiseConvBlock(3, 4, eps=eps)


@pytest.mark.parametrize("eps,error", [("1e-3", TypeError), (None, TypeError), (True, TypeError), (-1.0, ValueError)])
def test_bad_eps(eps, error):
    ones = np.ones(4, np.float32)
    with pytest.raises(error, match="eps"):
        pwcpu.fold_batchnorm(np.ones((4, 3)), None, ones, ones, ones, ones, eps=eps)
    with pytest.raises(error, match="eps"):
        pwcpu.PointwiseConvBlock(3, 4, eps=eps)
