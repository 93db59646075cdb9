"""depthwise_conv2d and DepthwiseConv against the float64 reference, on every ISA."""

import pickle

import numpy as np
import pytest

import pwcpu
from pwcpu import _core

from helpers import assert_within, depthwise_bound

ACTIVATIONS = list(pwcpu.ACTIVATIONS)


def data(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def check(x, w, b=None, **options):
    expected, tolerance = depthwise_bound(x, w, b, **{k: v for k, v in options.items() if k != "out"})
    y = pwcpu.depthwise_conv2d(x, w, b, **options)
    assert_within(y, expected, tolerance, str(options))
    return y


# Channel counts around every vector width (4, 8, 16) and the kernel's four-vector step.
@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 144])
def test_channel_counts(isa, rng, c):
    check(data(rng, (1, 6, 7, c)), data(rng, (c, 3, 3)), data(rng, (c,)), padding=1)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (5, 5), (3, 1), (1, 5), (7, 7), (2, 4)])
@pytest.mark.parametrize("stride", [1, 2, 3, (2, 1)])
@pytest.mark.parametrize("padding", [0, 1, 2, (0, 3)])
def test_geometry(isa, rng, kernel, stride, padding):
    c = 19
    x = data(rng, (2, 11, 13, c))
    check(x, data(rng, (c,) + kernel), data(rng, (c,)), stride=stride, padding=padding)


@pytest.mark.parametrize("hw", [1, 2, 3, 4])
def test_images_smaller_than_the_window(isa, rng, hw):
    c = 12
    x = data(rng, (1, hw, hw, c))
    for padding in (0, 1, 2):
        for kernel in (3, 5):
            y = check(x, data(rng, (c, kernel, kernel)), data(rng, (c,)), padding=padding)
            assert y.shape[1] == max(0, hw + 2 * padding - kernel + 1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_epilogue(isa, rng, activation, with_bias, with_residual):
    c = 37
    x = data(rng, (1, 9, 8, c))
    w, b = data(rng, (c, 3, 3)), data(rng, (c,)) if with_bias else None
    r = data(rng, (1, 5, 4, c)) if with_residual else None
    check(x, w, b, stride=2, padding=1, activation=activation, residual=r)


@pytest.mark.parametrize("activation", [None, "relu6"])
def test_out_is_residual(isa, rng, activation):
    c = 24
    x, w = data(rng, (1, 7, 7, c)), data(rng, (c, 3, 3))
    r = data(rng, (1, 7, 7, c))
    expected, tolerance = depthwise_bound(x, w, padding=1, activation=activation, residual=r.copy())
    y = pwcpu.depthwise_conv2d(x, w, padding=1, activation=activation, residual=r, out=r)
    assert y is r
    assert_within(r, expected, tolerance)


def test_pytorch_weight_layout(isa, rng):
    c = 10
    x, w = data(rng, (1, 6, 6, c)), data(rng, (c, 3, 3))
    np.testing.assert_array_equal(pwcpu.depthwise_conv2d(x, w[:, None], padding=1),
                                  pwcpu.depthwise_conv2d(x, w, padding=1))


def test_views_are_read_and_written_in_place(isa, rng):
    c = 16
    big = data(rng, (2, 20, 30, 3 * c))
    x = big[:, 3:15:2, 28:4:-3, c : 2 * c]  # strided, reversed, a channel slice
    w, b = data(rng, (c, 3, 3)), data(rng, (c,))
    buffer = np.zeros((2, 6, 8, 2 * c + 5), np.float32)
    out = buffer[:, :, :, 5 : 5 + c]
    y = check(x, w, b, padding=1, out=out)
    assert y is out
    assert not buffer[..., :5].any() and not buffer[..., 5 + c :].any()


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_run_lengths(isa, rng, kernel, stride):
    """Rows of every width up to two and a half runs: the interior pixels of a row go in runs
    whose tiles reuse input columns, with every leftover count, and channel counts with tails."""
    for c in (8, 13):
        w, b = data(rng, (c, kernel, kernel)), data(rng, (c,))
        for width in range(1, 21):
            x = data(rng, (1, kernel + 1, width * stride + kernel, c))
            check(x, w, b, stride=stride, activation="relu", residual=None)
            check(x, w, b, stride=stride, padding=kernel // 2)


@pytest.mark.parametrize("shape,kernel,padding", [((2, 7, 7, 40), 5, 2), ((1, 7, 9, 19), 7, 3), ((1, 5, 5, 8), 5, (2, 1))])
def test_small_maps_with_wide_filters(isa, rng, shape, kernel, padding):
    """Where most pixels are border pixels, the input is copied into a zero-padded tensor first:
    views, the epilogue and every row and pixel count of the runs that follow."""
    c = shape[-1]
    w, b = data(rng, (c, kernel, kernel)), data(rng, (c,))
    big = data(rng, (shape[0], 2 * shape[1], shape[2] + 3, c + 4))
    x = big[:, ::2, 3:, 2 : 2 + c]
    y = check(x, w, b, padding=padding, activation="relu6")
    check(x, w, b, padding=padding, activation="silu", residual=data(rng, y.shape))
    check(x[:, :, ::-1], w, b, padding=padding)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (5, 2, 2), (3, 2, 4), (5, 1, (3, 0))])
def test_padded_rows_of_backward_and_broadcast_views(isa, rng, kernel, stride, padding):
    """Taps in the top and bottom padding read the row of zeros as a run, laid out as the input's
    rows are: pixels that run backwards, and pixels that are one broadcast value."""
    c = 12
    w, b = data(rng, (c, kernel, kernel)), data(rng, (c,))
    backward = data(rng, (1, 9, 23, c))[:, ::-1, ::-2]
    check(backward, w, b, stride=stride, padding=padding)
    broadcast = np.broadcast_to(data(rng, (2, 7, 1, c)), (2, 7, 10, c))
    check(broadcast, w, b, stride=stride, padding=padding)


def test_non_contiguous_channels_are_copied(isa, rng):
    c = 9
    x = data(rng, (1, 5, 5, 2 * c))[..., ::2]
    check(x, data(rng, (c, 3, 3)), padding=1)


@pytest.mark.parametrize("shape", [(0, 5, 5, 4), (1, 0, 5, 4), (1, 5, 0, 4), (1, 5, 5, 0)])
def test_zero_size(isa, shape):
    c = shape[3]
    y = pwcpu.depthwise_conv2d(np.zeros(shape, np.float32), np.ones((c, 3, 3), np.float32), padding=1)
    assert y.shape == shape


@pytest.mark.parametrize("shape", [(1, 56, 56, 24), (2, 15, 17, 40), (1, 112, 9, 8)])
def test_result_does_not_depend_on_thread_count(isa, rng, shape):
    c = shape[3]
    x, w, b = data(rng, shape), data(rng, (c, 3, 3)), data(rng, (c,))
    results = []
    for threads in (1, 2, 3):
        pwcpu.set_num_threads(threads)
        results.append(pwcpu.depthwise_conv2d(x, w, b, stride=2, padding=1, activation="relu6"))
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])


def test_nan_and_inf_propagate(isa, rng):
    c = 8
    x = data(rng, (1, 4, 4, c))
    x[0, 1, 1, 3] = np.nan
    x[0, 2, 2, 5] = np.inf
    y = pwcpu.depthwise_conv2d(x, np.ones((c, 3, 3), np.float32), padding=1)
    assert np.isnan(y[0, 0:3, 0:3, 3]).all()
    assert np.isinf(y[0, 1:4, 1:4, 5]).all()
    assert np.isfinite(np.delete(y, [3, 5], axis=3)).all()


class TestDepthwiseConv:
    def test_matches_function(self, isa, rng):
        c = 33
        x, w, b = data(rng, (2, 9, 10, c)), data(rng, (c, 5, 5)), data(rng, (c,))
        layer = pwcpu.DepthwiseConv(w, b, stride=2, padding=2, activation="silu")
        assert layer.kernel == f"f32_dwconv_bias_act_{pwcpu.runtime_info()['isa']}"
        np.testing.assert_array_equal(layer(x), pwcpu.depthwise_conv2d(x, w, b, stride=2, padding=2, activation="silu"))

    def test_attributes_and_pickle(self, rng):
        c = 6
        w, b = data(rng, (c, 1, 3, 5)), data(rng, (c,))
        layer = pwcpu.DepthwiseConv(w, b, stride=(1, 2), padding=(1, 2), activation="relu")
        assert (layer.channels, layer.kernel_size, layer.stride, layer.padding) == (c, (3, 5), (1, 2), (1, 2))
        assert layer.in_channels == layer.out_channels == c
        assert layer.weight.shape == (c, 3, 5) and not layer.weight.flags.writeable
        w[:] = 0  # the layer keeps its own copy
        x = data(rng, (1, 6, 7, c))
        clone = pickle.loads(pickle.dumps(layer))
        np.testing.assert_array_equal(clone(x), layer(x))
        assert layer(x).any()
        assert "DepthwiseConv(channels=6" in repr(layer)

    def test_repacks_when_isa_changes(self, rng):
        c = 12
        w, x = data(rng, (c, 3, 3)), data(rng, (1, 5, 5, c))
        layer = pwcpu.DepthwiseConv(w, padding=1)
        expected = pwcpu.depthwise_conv2d(x, w, padding=1)
        try:
            _core.select_isa("scalar")
            assert_within(layer(x), *depthwise_bound(x, w, padding=1))
            assert layer.kernel == "f32_dwconv_bias_act_scalar"
        finally:
            _core.select_isa("auto")
        assert_within(layer(x), *depthwise_bound(x, w, padding=1))
        assert expected.shape == (1, 5, 5, c)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w: pwcpu.depthwise_conv2d(x.astype(np.float64), w), TypeError, "x must be float32"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w.astype(np.int32)), TypeError, "weight"),
        (lambda x, w: pwcpu.depthwise_conv2d(x[0], w), ValueError, r"x must have shape \(N, H, W, C\)"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w[:4]), ValueError, "x has 8 channels but the weight has C = 4"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w[:, None, :, :].repeat(2, 1)), ValueError, "one input channel"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w[:, 0]), ValueError, r"\(C, kh, kw\)"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w[:, :0]), ValueError, "at least 1x1"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, np.ones(3, np.float32)), ValueError, r"bias must have shape \(8,\)"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, stride=0), ValueError, "stride"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, padding=-1), ValueError, "padding"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, stride=1.5), TypeError, "stride"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, activation="tanh"), ValueError, "activation"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, out=np.zeros((1, 5, 5, 8), np.float32)), ValueError, "out must have shape"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, out=[0.0]), TypeError, "out must be a NumPy array"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, residual=np.zeros((1, 5, 5, 8), np.float32)), ValueError, "residual"),
        (lambda x, w: pwcpu.depthwise_conv2d(x, w, out=x[:, 1:-1, 1:-1]), ValueError, "overlaps x"),
    ],
)
def test_errors(rng, call, error, match):
    x, w = data(rng, (1, 5, 5, 8)), data(rng, (8, 3, 3))
    with pytest.raises(error, match=match):
        call(x, w)


def test_absurd_sizes_are_errors_not_crashes():
    one = np.ones(1, np.float32)
    with pytest.raises((MemoryError, ValueError)):
        pwcpu.DepthwiseConv(np.broadcast_to(one.reshape(1, 1, 1), (2**40, 3, 3)))
    with pytest.raises((MemoryError, ValueError)):
        pwcpu.depthwise_conv2d(np.broadcast_to(one, (1, 2**40, 2**20, 4)), np.ones((4, 3, 3), np.float32))
