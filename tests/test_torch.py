"""Cross-check against PyTorch's conv2d and activations (skipped when torch is not installed)."""

import numpy as np
import pytest

import pwcpu
from helpers import conv_bound, randn

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_ACTIVATIONS = {
    None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
    "hardswish": F.hardswish, "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid,
}


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("n,h,w,c,k,stride,padding,groups", [
    (1, 14, 14, 96, 576, 1, 0, 1),
    (2, 9, 7, 64, 48, 2, 1, 1),
    (1, 8, 8, 24, 24, (2, 1), (0, 1), 3),
    (3, 5, 5, 33, 65, 1, 0, 1),
])
def test_matches_torch_conv2d(isa, rng, activation, n, h, w, c, k, stride, padding, groups):
    x, weight, bias = randn(rng, n, h, w, c), randn(rng, k, c // groups, 1, 1), randn(rng, k)
    ours = pwcpu.conv1x1(x, weight, bias, stride=stride, padding=padding, groups=groups, activation=activation)
    residual = randn(rng, *ours.shape)
    ours = pwcpu.conv1x1(x, weight, bias, stride=stride, padding=padding, groups=groups, activation=activation,
                         residual=residual)
    with torch.inference_mode():
        z = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(weight), torch.from_numpy(bias),
                     stride=stride, padding=padding, groups=groups)
        theirs = TORCH_ACTIVATIONS[activation](z + torch.from_numpy(residual).permute(0, 3, 1, 2))
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    # Both are float32 computations within the reference bound, so they differ by at most twice it.
    _, tolerance = conv_bound(x, weight, bias, stride=stride, padding=padding, groups=groups, activation=activation,
                              residual=residual)
    assert np.all(np.abs(ours.astype(np.float64) - theirs) <= 2 * tolerance)
