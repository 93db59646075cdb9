"""layout="NCHW": computed directly as W[K, C] @ X[C, H*W] per image, against the reference."""

import pickle

import numpy as np
import pytest

import pwcpu
from pwcpu import reference
from helpers import check_conv, randn


@pytest.mark.parametrize("c,k", [(1, 1), (3, 7), (16, 17), (33, 64), (65, 31), (257, 129), (1000, 15)])
def test_channel_counts(isa, rng, c, k):
    x, weight, bias = randn(rng, 2, 5, 7, c)[:, :, :, :].transpose(0, 3, 1, 2).copy(), randn(rng, k, c), randn(rng, k)
    y = pwcpu.conv1x1(x, weight, bias, layout="NCHW")
    assert y.shape == (2, k, 5, 7)
    check_conv(y, x, weight, bias, layout="NCHW")


@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (13, 5), (9, 40)])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 3), (2, 0))])
@pytest.mark.parametrize("groups", [1, 3])
def test_geometry(isa, rng, hw, stride, padding, groups):
    x, weight, bias = randn(rng, 2, 12, *hw), randn(rng, 18, 12 // groups), randn(rng, 18)
    y = pwcpu.conv1x1(x, weight, bias, stride=stride, padding=padding, groups=groups, layout="NCHW")
    check_conv(y, x, weight, bias, stride=stride, padding=padding, groups=groups, layout="NCHW")


@pytest.mark.parametrize("activation", list(pwcpu.ACTIVATIONS))
def test_epilogue_and_out_is_residual(isa, rng, activation):
    x, weight, bias = randn(rng, 2, 40, 6, 9), randn(rng, 24, 40) * 0.3, randn(rng, 24)
    acc = randn(rng, 2, 24, 6, 9)
    residual = acc.copy()
    y = pwcpu.conv1x1(x, weight, bias, activation=activation, residual=acc, out=acc, layout="NCHW")
    assert y is acc
    check_conv(y, x, weight, bias, activation=activation, residual=residual, layout="NCHW")


def test_deep_reduction(isa, rng):
    x, weight, residual = randn(rng, 1, 9000, 3, 4), randn(rng, 20, 9000), randn(rng, 1, 20, 3, 4)
    y = pwcpu.conv1x1(x, weight, residual=residual, activation="relu", layout="NCHW")
    check_conv(y, x, weight, residual=residual, activation="relu", layout="NCHW")


def test_views_and_out_slices(isa, rng):
    weight = randn(rng, 10, 8)
    nhwc = randn(rng, 2, 9, 11, 8)
    channels_last = nhwc.transpose(0, 3, 1, 2)  # NCHW shape over channels-last memory: gathered in place
    strided = randn(rng, 3, 16, 20, 22)[::2, ::2, 1:10, ::-2]
    for x in (channels_last, strided):
        buffer = np.zeros((x.shape[0], 30) + x.shape[2:], np.float32)
        out = buffer[:, 5:15]  # a channel slice of a concatenation buffer: planes stay contiguous
        assert pwcpu.conv1x1(x, weight, out=out, layout="NCHW") is out
        check_conv(out, x, weight, layout="NCHW")
        assert np.all(buffer[:, :5] == 0) and np.all(buffer[:, 15:] == 0)


def test_errors():
    x = np.ones((1, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="x has 3 channels"):
        pwcpu.conv1x1(np.ones((1, 3, 4, 4), np.float32), np.ones((2, 4), np.float32), layout="NCHW")
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\)"):
        pwcpu.conv1x1(np.ones((4, 3, 3), np.float32), np.ones((2, 4), np.float32), layout="NCHW")
    with pytest.raises(ValueError, match=r"contiguous \(H, W\) planes"):
        pwcpu.conv1x1(x, np.ones((2, 4), np.float32), out=np.zeros((1, 2, 3, 6), np.float32)[..., ::2],
                      layout="NCHW")
    with pytest.raises(ValueError, match="layout must be 'NHWC' or 'NCHW'"):
        pwcpu.conv1x1(x, np.ones((2, 4), np.float32), layout="NWHC")
    with pytest.raises(TypeError, match="layout must be"):
        pwcpu.PointwiseConv(np.ones((2, 4), np.float32), layout=None)


def test_layer_and_block(isa, rng):
    weight, bias = randn(rng, 12, 6), randn(rng, 12)
    layer = pwcpu.PointwiseConv(weight, bias, stride=2, activation="silu", layout="NCHW")
    x = randn(rng, 2, 6, 9, 9)
    y = layer(x)
    check_conv(y, x, weight, bias, stride=2, activation="silu", layout="NCHW")
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.layout == "NCHW"
    np.testing.assert_array_equal(clone(x), y)
    block = pwcpu.PointwiseConvBlock(6, 12, activation=None, layout="NCHW")
    state = {"conv.weight": weight[:, :, None, None], "bn.weight": rng.uniform(0.5, 1.5, 12),
             "bn.bias": randn(rng, 12), "bn.running_mean": randn(rng, 12), "bn.running_var": rng.uniform(0.5, 1.5, 12)}
    block.load_state_dict(state)
    # The block is the convolution followed by BatchNorm, computed here in float64 from its parameters.
    scale = state["bn.weight"] / np.sqrt(state["bn.running_var"] + block.eps)
    expected = (reference.conv1x1(x, weight, layout="NCHW") - state["bn.running_mean"][:, None, None]) \
        * scale[:, None, None] + state["bn.bias"][:, None, None]
    np.testing.assert_allclose(block(x), expected, rtol=1e-5, atol=1e-5)
    nhwc_block = pwcpu.PointwiseConvBlock(6, 12, activation=None)
    nhwc_block.load_state_dict(block.state_dict())
    np.testing.assert_allclose(np.moveaxis(nhwc_block(x.transpose(0, 2, 3, 1)), -1, 1), block(x),
                               rtol=1e-5, atol=1e-5)
