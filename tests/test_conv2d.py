"""conv2d and DenseConv (dense kh x kw convolution through im2col rows) against the float64
reference, on every ISA."""

import pickle

import numpy as np
import pytest

import pwcpu
from pwcpu import _core

from helpers import assert_within, dense_bound

ACTIVATIONS = list(pwcpu.ACTIVATIONS)


def data(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def check(x, w, b=None, **options):
    expected, tolerance = dense_bound(x, w, b, **{k: v for k, v in options.items() if k != "out"})
    y = pwcpu.conv2d(x, w, b, **options)
    assert_within(y, expected, tolerance, str(options))
    return y


# Input channels from a stem's 3 to deep layers, output channels around the kernels' widths.
@pytest.mark.parametrize("c", [1, 3, 4, 7, 16, 33, 64])
@pytest.mark.parametrize("k", [1, 5, 8, 16, 17, 32, 47])
def test_channel_counts(isa, rng, c, k):
    check(data(rng, (1, 7, 6, c)), data(rng, (k, c, 3, 3)), data(rng, (k,)), padding=1)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (5, 5), (7, 7), (3, 1), (2, 4)])
@pytest.mark.parametrize("stride", [1, 2, (2, 1)])
@pytest.mark.parametrize("padding", [0, 1, 3, (0, 2)])
def test_geometry(isa, rng, kernel, stride, padding):
    x = data(rng, (2, 11, 13, 5))
    check(x, data(rng, (9, 5) + kernel), data(rng, (9,)), stride=stride, padding=padding)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("view", [False, True])
def test_stems(isa, rng, c, kernel, view):
    """Image stems: windows of 1 or 3 channels copied as fixed-length runs, in a contiguous image
    and in a view whose pixels are not adjacent (the general path)."""
    x = data(rng, (2, 19, 23, 2 * c))
    x = x[..., ::2] if view else np.ascontiguousarray(x[..., :c])
    for stride in (1, 2):
        check(x, data(rng, (16, c, kernel, kernel)), data(rng, (16,)), stride=stride, padding=kernel // 2,
              activation="relu6")


@pytest.mark.parametrize("hw", [1, 2, 3])
def test_images_smaller_than_the_window(isa, rng, hw):
    x = data(rng, (1, hw, hw, 6))
    for padding in (0, 1, 2):
        y = check(x, data(rng, (10, 6, 3, 3)), data(rng, (10,)), padding=padding)
        assert y.shape[1] == max(0, hw + 2 * padding - 2)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_epilogue(isa, rng, activation, with_residual):
    x, w, b = data(rng, (1, 9, 8, 12)), data(rng, (20, 12, 3, 3)), data(rng, (20,))
    r = data(rng, (1, 5, 4, 20)) if with_residual else None
    check(x, w, b, stride=2, padding=1, activation=activation, residual=r)


# ResNeXt's and RegNet's grouped layers: group widths of 1 (C = groups, K = 2C), 4 and 8, with
# per-group output counts around the narrow kernel's width.
@pytest.mark.parametrize("c,k,groups", [(6, 12, 6), (8, 8, 2), (16, 24, 4), (24, 24, 3), (48, 48, 6), (40, 80, 5)])
def test_groups(isa, rng, c, k, groups):
    x, w, b = data(rng, (2, 9, 7, c)), data(rng, (k, c // groups, 3, 3)), data(rng, (k,))
    check(x, w, b, stride=(2, 1), padding=1, groups=groups, activation="relu")


def test_out_is_residual(isa, rng):
    x, w = data(rng, (1, 7, 7, 8)), data(rng, (8, 8, 3, 3))
    r = data(rng, (1, 7, 7, 8))
    expected, tolerance = dense_bound(x, w, padding=1, activation="relu", residual=r.copy())
    y = pwcpu.conv2d(x, w, padding=1, activation="relu", residual=r, out=r)
    assert y is r
    assert_within(r, expected, tolerance)


# Tall images take many bands of im2col rows; wide layers take the whole image at once (their
# weights outweigh a band). Batches restart the bands per image. With rows_taken_first, threads
# start on each other's bands.
@pytest.mark.parametrize("taken", [False, True])
@pytest.mark.parametrize("shape,k", [((2, 150, 40, 16), 24), ((1, 7, 7, 256), 256), ((3, 30, 20, 3), 32)])
def test_bands_and_thread_counts(isa, rng, shape, k, taken, request):
    if taken:
        request.getfixturevalue("rows_taken_first")
    x, w, b = data(rng, shape), data(rng, (k, shape[3], 3, 3)), data(rng, (k,))
    r = data(rng, shape[:3] + (k,))
    results = []
    for threads in (1, 2, 3):
        pwcpu.set_num_threads(threads)
        results.append(pwcpu.conv2d(x, w, b, padding=1, activation="relu6", residual=r))
    assert_within(results[0], *dense_bound(x, w, b, padding=1, activation="relu6", residual=r))
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])


def test_views_are_read_and_written_in_place(isa, rng):
    c, k = 6, 10
    big = data(rng, (2, 20, 30, 3 * c))
    x = big[:, 3:15:2, 28:4:-3, c : 2 * c]  # strided, reversed, a channel slice
    w, b = data(rng, (k, c, 3, 3)), data(rng, (k,))
    buffer = np.zeros((2, 6, 8, k + 7), np.float32)
    out = buffer[:, :, :, 5 : 5 + k]
    y = check(x, w, b, padding=1, out=out)
    assert y is out
    assert not buffer[..., :5].any() and not buffer[..., 5 + k :].any()


def test_non_contiguous_channels_are_copied(isa, rng):
    x = data(rng, (1, 5, 5, 8))[..., ::2]
    check(x, data(rng, (3, 4, 3, 3)), padding=1)


@pytest.mark.parametrize("shape", [(0, 5, 5, 4), (1, 0, 5, 4), (1, 5, 0, 4), (1, 5, 5, 0)])
def test_zero_size(isa, shape):
    y = pwcpu.conv2d(np.zeros(shape, np.float32), np.ones((6, shape[3], 3, 3), np.float32), np.ones(6, np.float32),
                     padding=1)
    assert y.shape == shape[:3] + (6,)
    assert (y == 1).all()  # no channels: the bias alone


@pytest.mark.parametrize("c,k,groups", [(3, 32, 1), (24, 48, 3)])
def test_matches_pytorch(rng, c, k, groups):
    torch = pytest.importorskip("torch")
    x, w, b = data(rng, (2, 17, 15, c)), data(rng, (k, c // groups, 3, 3)), data(rng, (k,))
    want = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w), torch.from_numpy(b),
                                      stride=2, padding=1, groups=groups).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(pwcpu.conv2d(x, w, b, stride=2, padding=1, groups=groups), want, rtol=1e-5, atol=1e-5)


class TestDenseConv:
    def test_matches_function(self, isa, rng):
        x, w, b = data(rng, (2, 9, 10, 7)), data(rng, (33, 7, 5, 5)), data(rng, (33,))
        layer = pwcpu.DenseConv(w, b, stride=2, padding=2, activation="silu")
        assert layer.kernel.endswith("_" + pwcpu.runtime_info()["isa"])  # fp32 kernels
        np.testing.assert_array_equal(layer(x), pwcpu.conv2d(x, w, b, stride=2, padding=2, activation="silu"))

    def test_attributes_and_pickle(self, rng):
        w, b = data(rng, (6, 1, 3, 5)), data(rng, (6,))
        layer = pwcpu.DenseConv(w, b, stride=(1, 2), padding=(1, 2), groups=3, activation="relu")
        assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.groups) == (3, 6, (3, 5), 3)
        assert (layer.stride, layer.padding) == ((1, 2), (1, 2))
        assert layer.weight.shape == (6, 1, 3, 5) and not layer.weight.flags.writeable
        w[:] = 0  # the layer keeps its own copy
        x = data(rng, (1, 6, 7, 3))
        clone = pickle.loads(pickle.dumps(layer))
        np.testing.assert_array_equal(clone(x), layer(x))
        assert layer(x).any()
        assert "DenseConv(in_channels=3, out_channels=6" in repr(layer) and "groups=3" in repr(layer)

    def test_repacks_when_isa_changes(self, rng):
        w, x = data(rng, (12, 4, 3, 3)), data(rng, (1, 5, 5, 4))
        layer = pwcpu.DenseConv(w, padding=1)
        try:
            _core.select_isa("scalar")
            assert_within(layer(x), *dense_bound(x, w, padding=1))
            assert layer.kernel.endswith("scalar")
        finally:
            _core.select_isa("auto")
        assert_within(layer(x), *dense_bound(x, w, padding=1))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w: pwcpu.conv2d(x.astype(np.float64), w), TypeError, "x must be float32"),
        (lambda x, w: pwcpu.conv2d(x, w.astype(np.int32)), TypeError, "weight"),
        (lambda x, w: pwcpu.conv2d(x[0], w), ValueError, r"x must have shape \(N, H, W, C\)"),
        (lambda x, w: pwcpu.conv2d(x, w[:, :4]), ValueError, "x has 8 channels but the weight takes C = 4"),
        (lambda x, w: pwcpu.conv2d(x, w[:, :, 0]), ValueError, r"\(K, C // groups, kh, kw\)"),
        (lambda x, w: pwcpu.conv2d(x, w[:, :, :0]), ValueError, "at least 1x1"),
        (lambda x, w: pwcpu.conv2d(x, w[:, :2], groups=4), ValueError, "groups"),
        (lambda x, w: pwcpu.conv2d(x, w[:5, :2], groups=4), ValueError, "must divide"),
        (lambda x, w: pwcpu.conv2d(x, w[:, :2], groups=0), ValueError, "groups"),
        (lambda x, w: pwcpu.conv2d(x, w[:, :2], groups=2.0), TypeError, "groups"),
        (lambda x, w: pwcpu.conv2d(x, w, np.ones(3, np.float32)), ValueError, r"bias must have shape \(6,\)"),
        (lambda x, w: pwcpu.conv2d(x, w, stride=0), ValueError, "stride"),
        (lambda x, w: pwcpu.conv2d(x, w, padding=-1), ValueError, "padding"),
        (lambda x, w: pwcpu.conv2d(x, w, activation="tanh"), ValueError, "activation"),
        (lambda x, w: pwcpu.conv2d(x, w, out=np.zeros((1, 5, 5, 6), np.float32)), ValueError, "out must have shape"),
        (lambda x, w: pwcpu.conv2d(x, w, residual=np.zeros((1, 5, 5, 6), np.float32)), ValueError, "residual"),
        (lambda x, w: pwcpu.conv2d(x, w, padding=1, out=x[..., :6]), ValueError, "overlaps x"),
    ],
)
def test_errors(rng, call, error, match):
    x, w = data(rng, (1, 5, 5, 8)), data(rng, (6, 8, 3, 3))
    with pytest.raises(error, match=match):
        call(x, w)


def test_absurd_sizes_are_errors_not_crashes():
    one = np.ones(1, np.float32)
    with pytest.raises((MemoryError, ValueError)):
        pwcpu.DenseConv(np.broadcast_to(one.reshape(1, 1, 1, 1), (2**20, 2**20, 3, 3)))
    with pytest.raises((MemoryError, ValueError)):
        pwcpu.conv2d(np.broadcast_to(one, (1, 2**40, 2**20, 4)), np.ones((4, 4, 3, 3), np.float32))
