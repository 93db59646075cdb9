"""The fused inverted residual block against its stages computed by the float64 reference."""

import pickle

import numpy as np
import pytest

import pwcpu
from pwcpu import reference

UNIT_ROUNDOFF = 2.0**-24


def data(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def block_weights(rng, c, e, k, kernel=3, expand=True):
    return dict(
        expand_weight=data(rng, e, c, scale=c**-0.5) if expand else None,
        expand_bias=data(rng, e) if expand else None,
        depthwise_weight=data(rng, e, kernel, kernel, scale=1 / kernel),
        depthwise_bias=data(rng, e),
        project_weight=data(rng, k, e, scale=e**-0.5),
        project_bias=data(rng, k),
    )


def expected(x, w, stride, padding, activation, project_activation, residual):
    """(float64 result, error bound): each stage's float32 sums are off by at most n u times the
    same stage computed on absolute values; the activations do not amplify errors (Lipschitz 1
    for relu/relu6, below 1.1 for silu and hardswish)."""
    def stages(x, w, absolute):
        f = np.abs if absolute else (lambda a: a)
        act = None if absolute else activation
        h = f(x)
        if w["expand_weight"] is not None:
            h = reference.conv1x1(h, f(w["expand_weight"]), f(w["expand_bias"]), activation=act)
        h = reference.depthwise_conv2d(h, f(w["depthwise_weight"]), f(w["depthwise_bias"]), stride=stride,
                                       padding=padding, activation=act)
        return reference.conv1x1(h, f(w["project_weight"]), f(w["project_bias"]),
                                 activation=None if absolute else project_activation,
                                 residual=f(x) if residual else None)
    c, e = x.shape[3], w["depthwise_weight"].shape[0]
    taps = w["depthwise_weight"].shape[1] * w["depthwise_weight"].shape[2]
    return stages(x, w, False), 1.2 * (c + taps + e + 4) * UNIT_ROUNDOFF * stages(x, w, True) + 1e-30


def check(block, x, w, stride, padding, activation="relu6", project_activation=None, residual=False, out=None):
    y = block(x, out=out)
    want, bound = expected(x, w, stride, padding, activation, project_activation, residual)
    assert y.shape == want.shape and y.dtype == np.float32
    error = np.abs(y - want)
    assert (error <= bound).all(), f"max error {error.max()} at {np.unravel_index(error.argmax(), error.shape)}"
    return y


# MobileNetV2's block kinds (smaller images): expand + stride 2; expand + residual; no expansion;
# a 5x5 kernel (EfficientNet) with stride 2; a wide projection without residual. The last two have
# weights larger than their activations and run their stages in turn; the others run in bands.
CASES = [
    (2, 13, 15, 16, 96, 24, 3, 2, True),
    (1, 14, 14, 24, 144, 24, 3, 1, True),
    (1, 9, 11, 32, 32, 16, 3, 1, False),
    (1, 12, 10, 24, 72, 40, 5, 2, True),
    (2, 7, 7, 64, 384, 96, 3, 1, True),
    (1, 1, 1, 8, 48, 8, 3, 1, True),
]


@pytest.mark.parametrize("n,h,w_,c,e,k,kernel,stride,expand", CASES)
def test_matches_its_stages(isa, rng, n, h, w_, c, e, k, kernel, stride, expand):
    w = block_weights(rng, c, e, k, kernel, expand)
    block = pwcpu.InvertedResidual(**w, stride=stride)
    residual = stride == 1 and c == k
    assert block.residual == residual
    x = data(rng, n, h, w_, c)
    check(block, x, w, stride, kernel // 2, residual=residual)


@pytest.mark.parametrize("activation", ["relu", "silu", "hardswish"])
def test_activations(isa, rng, activation):
    w = block_weights(rng, 16, 64, 16)
    block = pwcpu.InvertedResidual(**w, activation=activation, project_activation="relu")
    check(block, data(rng, 1, 10, 9, 16), w, 1, 1, activation, "relu", residual=True)


@pytest.mark.parametrize("h", [97, 300])
def test_many_bands_and_threads(rng, h):
    """Tall images cross many bands (rows shared between bands move, not recompute); the result
    does not depend on the thread count."""
    c, e = 24, 384
    w = block_weights(rng, c, e, c)
    x = data(rng, 2, h, 10, c)
    results = []
    for threads, stride in [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)]:
        pwcpu.set_num_threads(threads)
        block = pwcpu.InvertedResidual(**w, stride=stride)
        if threads == 1:
            check(block, x, w, stride, 1, residual=stride == 1)
        results.append((stride, block(x)))
    for stride, y in results:
        np.testing.assert_array_equal(y, next(r for s, r in results if s == stride))


def test_out_views_and_pickle(rng):
    w = block_weights(rng, 16, 48, 16)
    block = pwcpu.InvertedResidual(**w)
    x = data(rng, 1, 8, 8, 16)
    buffer = np.zeros((1, 8, 8, 40), np.float32)
    y = check(block, x, w, 1, 1, residual=True, out=buffer[..., 8:24])
    assert y.base is buffer and not buffer[..., :8].any() and not buffer[..., 24:].any()
    clone = pickle.loads(pickle.dumps(block))
    np.testing.assert_array_equal(clone(x), block(x))
    assert "InvertedResidual(in_channels=16, hidden_channels=48" in repr(block)


def test_errors(rng):
    w = block_weights(rng, 16, 48, 24)
    with pytest.raises(ValueError, match="residual=True"):
        pwcpu.InvertedResidual(**w, residual=True)
    with pytest.raises(ValueError, match="project_weight takes"):
        pwcpu.InvertedResidual(**{**w, "project_weight": data(rng, 24, 47)})
    with pytest.raises(ValueError, match="expand_weight has"):
        pwcpu.InvertedResidual(**{**w, "expand_weight": data(rng, 40, 16)})
    with pytest.raises(TypeError, match="residual"):
        pwcpu.InvertedResidual(**w, residual="yes")
    block = pwcpu.InvertedResidual(**w)
    with pytest.raises(ValueError, match="x has 8 channels but the block expects C = 16"):
        block(data(rng, 1, 5, 5, 8))
    with pytest.raises(TypeError, match="float32"):
        block(np.zeros((1, 5, 5, 16)))
    x = data(rng, 1, 5, 5, 16)
    with pytest.raises(ValueError, match="out must have shape"):
        block(x, out=np.zeros((1, 5, 5, 16), np.float32))


def test_absurd_sizes_are_errors_not_crashes():
    one = np.ones((1, 1), np.float32)
    with pytest.raises((MemoryError, ValueError)):
        pwcpu.InvertedResidual(np.broadcast_to(one, (2**33, 4)), None, np.broadcast_to(one[..., None], (2**33, 3, 3)),
                               None, np.broadcast_to(one, (4, 2**33)))
    block = pwcpu.InvertedResidual(np.ones((8, 4), np.float32), None, np.ones((8, 3, 3), np.float32), None,
                                   np.ones((4, 8), np.float32))
    with pytest.raises((MemoryError, ValueError)):
        block(np.broadcast_to(np.ones(1, np.float32), (1, 3, 2**60, 4)))


@pytest.mark.parametrize("n,h,w_,c,k,kernel,stride", [(1, 13, 11, 32, 64, 3, 1), (2, 9, 10, 24, 40, 5, 2), (1, 1, 1, 8, 8, 3, 1)])
def test_depthwise_separable_matches_its_stages(isa, rng, n, h, w_, c, k, kernel, stride):
    dw, db = data(rng, c, kernel, kernel, scale=1 / kernel), data(rng, c)
    pw, pb = data(rng, k, c, scale=c**-0.5), data(rng, k)
    block = pwcpu.DepthwiseSeparable(dw, db, pw, pb, stride=stride, activation="relu6", pointwise_activation="silu")
    assert (block.in_channels, block.out_channels, block.padding) == (c, k, (kernel // 2, kernel // 2))
    x = data(rng, n, h, w_, c)
    w = dict(expand_weight=None, expand_bias=None, depthwise_weight=dw, depthwise_bias=db, project_weight=pw,
             project_bias=pb)
    y = check(block, x, w, stride, kernel // 2, activation="relu6", project_activation="silu")
    clone = pickle.loads(pickle.dumps(block))
    np.testing.assert_array_equal(clone(x), y)
    assert clone.pointwise_activation == "silu" and "DepthwiseSeparable(in_channels=" in repr(clone)
    with pytest.raises(ValueError, match="pointwise_weight takes"):
        pwcpu.DepthwiseSeparable(dw, db, data(rng, k, c + 1))
    with pytest.raises(ValueError, match="pointwise_bias"):
        pwcpu.DepthwiseSeparable(dw, db, pw, data(rng, k + 1))
