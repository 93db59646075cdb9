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


# Lipschitz constants of the activations (silu and hardswish: below 1.1).
LIPSCHITZ = {None: 1.0, "relu": 1.0, "relu6": 1.0, "silu": 1.1, "hardswish": 1.1, "sigmoid": 0.25,
             "hardsigmoid": 1 / 6}


def _stage(value, bound, op, weight, bias, length, activation):
    """A linear stage op(value, weight, bias) then the activation, in float64, with the error bound
    of the float32 computation: the input's error through |weight|, plus float32 sums of `length`
    terms off by at most length u times the sum of absolute values, plus a few units of roundoff
    in the activation."""
    z = op(value, weight, bias)
    absolute = op(np.abs(value), np.abs(weight), None if bias is None else np.abs(bias))
    z_bound = op(bound, np.abs(weight), None) + 1.2 * (length + 2) * UNIT_ROUNDOFF * absolute
    y = reference.ACTIVATION_FUNCTIONS[activation](z)
    return y, LIPSCHITZ[activation] * z_bound + 8 * UNIT_ROUNDOFF * np.abs(y) + 1e-30


def expected(x, w, stride, padding, activation, project_activation, residual, se=None):
    """(float64 result, error bound), the bound carried stage by stage. `se`: the squeeze-excitation's
    (reduce_weight, reduce_bias, expand_weight, expand_bias, se_activation, se_gate), or None."""
    def depthwise(v, weight, bias):
        return reference.depthwise_conv2d(v, weight, bias, stride=stride, padding=padding)

    h, bound = np.asarray(x, np.float64), np.zeros(x.shape)
    if w["expand_weight"] is not None:
        h, bound = _stage(h, bound, reference.conv1x1, w["expand_weight"], w["expand_bias"], x.shape[3], activation)
    taps = w["depthwise_weight"].shape[1] * w["depthwise_weight"].shape[2]
    h, bound = _stage(h, bound, depthwise, w["depthwise_weight"], w["depthwise_bias"], taps, activation)
    if se is not None:
        reduce_w, reduce_b, expand_w, expand_b, se_activation, gate = se
        pixels = h.shape[1] * h.shape[2]
        mean = h.mean(axis=(1, 2), keepdims=True)
        mean_bound = bound.mean(axis=(1, 2), keepdims=True) + \
            1.2 * (h.shape[2] + 2) * UNIT_ROUNDOFF * np.abs(h).mean(axis=(1, 2), keepdims=True)
        assert pixels >= 1
        squeezed = _stage(mean, mean_bound, reference.conv1x1, reduce_w, reduce_b, h.shape[3], se_activation)
        scale, scale_bound = _stage(*squeezed, reference.conv1x1, expand_w, expand_b, reduce_w.shape[0], gate)
        bound = bound * np.abs(scale) + np.abs(h) * scale_bound + UNIT_ROUNDOFF * np.abs(h * scale)
        h = h * scale
    y, bound = _stage(h, bound, reference.conv1x1, w["project_weight"], w["project_bias"], h.shape[3], None)
    if residual:
        y = y + x
        bound = bound + UNIT_ROUNDOFF * np.abs(y)
    y_act = reference.ACTIVATION_FUNCTIONS[project_activation](y)
    return y_act, LIPSCHITZ[project_activation] * bound + 8 * UNIT_ROUNDOFF * np.abs(y_act) + 1e-30


def check(block, x, w, stride, padding, activation="relu6", project_activation=None, residual=False, out=None,
          se=None):
    y = block(x, out=out)
    want, bound = expected(x, w, stride, padding, activation, project_activation, residual, se)
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


def excitation_weights(rng, e, s):
    return dict(se_reduce_weight=data(rng, s, e, scale=e**-0.5), se_reduce_bias=data(rng, s),
                se_expand_weight=data(rng, e, s, scale=s**-0.5), se_expand_bias=data(rng, e))


def se_tuple(se, activation="silu", gate="sigmoid"):
    return (se["se_reduce_weight"], se["se_reduce_bias"], se["se_expand_weight"], se["se_expand_bias"], activation, gate)


# EfficientNet-B0's block kinds with squeeze-excitation (smaller images): the first block (no
# expansion); expand + 3x3 + residual on a map large enough to run in bands (expand and depthwise
# fused, then scaled and projected band by band); 5x5 stride 2; wide layers on a small map (every
# stage on whole tensors); a map of one pixel.
SE_CASES = [
    (2, 20, 18, 32, 32, 16, 8, 3, 1, False),
    (2, 56, 40, 24, 144, 24, 6, 3, 1, True),
    (1, 23, 21, 40, 240, 80, 10, 5, 2, True),
    (2, 7, 7, 192, 1152, 192, 48, 5, 1, True),
    (1, 1, 1, 16, 96, 16, 4, 3, 1, True),
]


@pytest.mark.parametrize("n,h,w_,c,e,k,s,kernel,stride,expand", SE_CASES)
def test_squeeze_excitation_matches_its_stages(isa, rng, n, h, w_, c, e, k, s, kernel, stride, expand):
    w = block_weights(rng, c, e, k, kernel, expand)
    se = excitation_weights(rng, e, s)
    block = pwcpu.InvertedResidual(**w, **se, stride=stride, activation="silu")
    residual = stride == 1 and c == k
    assert block.se_channels == s and block.residual == residual
    x = data(rng, n, h, w_, c)
    y = check(block, x, w, stride, kernel // 2, activation="silu", residual=residual, se=se_tuple(se))
    if n > 1:  # each image has its own scale: the same image alone gives the same result
        np.testing.assert_array_equal(block(x[1:2]), y[1:2])


@pytest.mark.parametrize("se_activation,gate", [("relu", "sigmoid"), ("relu", "hardsigmoid"), ("silu", "hardswish"),
                                                (None, "sigmoid")])
def test_squeeze_excitation_activations(rng, se_activation, gate):
    w = block_weights(rng, 16, 64, 24)
    se = excitation_weights(rng, 64, 16)
    block = pwcpu.InvertedResidual(**w, **se, se_activation=se_activation, se_gate=gate, activation="hardswish")
    check(block, data(rng, 2, 9, 10, 16), w, 1, 1, "hardswish", se=se_tuple(se, se_activation, gate))


@pytest.mark.parametrize("h", [61, 130])
def test_squeeze_excitation_bands_and_threads(rng, h):
    """Bands of rows and any thread count: the means are summed in the same order, so the result
    does not depend on the thread count."""
    c, e = 24, 144
    w = block_weights(rng, c, e, c)
    se = excitation_weights(rng, e, 6)
    x = data(rng, 2, h, 33, c)
    results = []
    for threads, stride in [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)]:
        pwcpu.set_num_threads(threads)
        block = pwcpu.InvertedResidual(**w, **se, stride=stride, activation="silu")
        if threads == 1:
            check(block, x, w, stride, 1, activation="silu", residual=stride == 1, se=se_tuple(se))
        results.append((stride, block(x)))
    for stride, y in results:
        np.testing.assert_array_equal(y, next(r for s, r in results if s == stride))


def test_squeeze_excitation_pickle_repr_and_errors(rng):
    w = block_weights(rng, 16, 48, 16)
    se = excitation_weights(rng, 48, 12)
    block = pwcpu.InvertedResidual(**w, **{**se, "se_reduce_weight": se["se_reduce_weight"][..., None, None]},
                                   se_activation="relu")
    x = data(rng, 1, 8, 8, 16)
    clone = pickle.loads(pickle.dumps(block))
    np.testing.assert_array_equal(clone(x), block(x))
    assert "se_channels=12" in repr(clone) and clone.se_channels == 12
    assert pwcpu.InvertedResidual(**w).se_channels == 0
    with pytest.raises(ValueError, match="needs both se_reduce_weight and se_expand_weight"):
        pwcpu.InvertedResidual(**w, se_reduce_weight=se["se_reduce_weight"])
    with pytest.raises(ValueError, match="without the squeeze-excitation weights"):
        pwcpu.InvertedResidual(**w, se_expand_bias=se["se_expand_bias"])
    with pytest.raises(ValueError, match="se_reduce_weight takes 47 channels"):
        pwcpu.InvertedResidual(**w, **{**se, "se_reduce_weight": data(rng, 12, 47)})
    with pytest.raises(ValueError, match=r"se_expand_weight must have shape \(48, 12\)"):
        pwcpu.InvertedResidual(**w, **{**se, "se_expand_weight": data(rng, 48, 11)})
    with pytest.raises(ValueError, match="se_reduce_bias must have shape"):
        pwcpu.InvertedResidual(**w, **{**se, "se_reduce_bias": data(rng, 11)})
    with pytest.raises(ValueError, match="se_gate"):
        pwcpu.InvertedResidual(**w, **se, se_gate="tanh")
    with pytest.raises(TypeError, match="se_expand_weight"):
        pwcpu.InvertedResidual(**w, **{**se, "se_expand_weight": "weights"})


@pytest.mark.parametrize("threads", [1, 2])
def test_repeated_calls_take_their_work_memory_from_the_threads_arenas(rng, threads):
    """A fused block, a padded 5x5 depthwise layer (on a zero-padded copy) and a dense 3x3 layer
    (im2col bands) called in turn: after the first calls, every work buffer comes from the calling
    threads' scratch arenas (no fresh memory per call), and the results stay the same."""
    pwcpu.set_num_threads(threads)
    block = pwcpu.InvertedResidual(**block_weights(rng, 16, 96, 24), stride=2)
    depthwise = pwcpu.DepthwiseConv(data(rng, 672, 5, 5), data(rng, 672), padding=2)
    dense = pwcpu.DenseConv(data(rng, 32, 16, 3, 3, scale=0.1), None, padding=1)
    x_block, x_depthwise = data(rng, 1, 56, 56, 16), data(rng, 1, 7, 7, 672)
    layers = [(block, x_block), (depthwise, x_depthwise), (dense, x_block)]
    first = [layer(x) for layer, x in layers]
    for _ in range(3):  # the arenas grow to what the calls need at once, up to once per buffer
        for layer, x in layers:
            layer(x)
    misses = pwcpu.runtime_info()["scratch_misses"]
    for _ in range(3):
        for (layer, x), expected in zip(layers, first):
            np.testing.assert_array_equal(layer(x), expected)
    assert pwcpu.runtime_info()["scratch_misses"] == misses


@pytest.mark.parametrize("stride", [1, 2])
def test_rows_taken_from_other_threads_give_the_same_result(rng, rows_taken_first, stride):
    """Rows a thread takes from the end of another's range (fused blocks recompute the expanded
    rows they share with the rows before, depthwise layers just compute them) give bitwise the
    result of one thread, over images of several bands, batches and thread counts; with
    squeeze-excitation too (its fused bands and its scaled-and-projected bands)."""
    w = block_weights(rng, 24, 96, 24)
    se = excitation_weights(rng, 96, 6)
    x = data(rng, 3, 29, 10, 24)
    block = pwcpu.InvertedResidual(**w, stride=stride)
    excited = pwcpu.InvertedResidual(**w, **se, stride=stride, activation="silu")
    depthwise = pwcpu.DepthwiseConv(data(rng, 24, 5, 5), data(rng, 24), stride=stride, padding=2)
    pwcpu.set_num_threads(1)
    check(block, x, w, stride, 1, residual=stride == 1)
    check(excited, x, w, stride, 1, activation="silu", residual=stride == 1, se=se_tuple(se))
    expected = block(x), excited(x), depthwise(x)
    for threads in (2, 3):
        pwcpu.set_num_threads(threads)
        np.testing.assert_array_equal(block(x), expected[0])
        np.testing.assert_array_equal(excited(x), expected[1])
        np.testing.assert_array_equal(depthwise(x), expected[2])
