"""Property-based: random valid argument combinations agree with the reference on a random ISA."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pwcpu
from pwcpu import _core
from helpers import check_conv

SUPPORTED_ISAS = _core.runtime_info()["supported_isas"]


@st.composite
def conv_calls(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    cg, kg = draw(st.integers(0, 24)), draw(st.integers(0, 40))
    n, h, w = draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(0, 9))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2))))
    return dict(
        isa=draw(st.sampled_from(SUPPORTED_ISAS)),
        shape=(n, h, w, cg * groups), k=kg * groups, groups=groups, stride=stride, padding=padding,
        activation=draw(st.sampled_from(list(pwcpu.ACTIVATIONS))),
        bias=draw(st.booleans()), residual=draw(st.booleans()),
        x_view=draw(st.sampled_from(["contiguous", "crop", "reversed"])),
        out=draw(st.sampled_from(["none", "fresh", "slice", "residual"])),
        threads=draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**32 - 1)),
        layout=draw(st.sampled_from(["NHWC", "NCHW"])),
    )


def make_x(rng, shape, view):
    if view == "contiguous":
        return rng.standard_normal(shape, dtype=np.float32)
    big = rng.standard_normal(tuple(s + 2 for s in shape), dtype=np.float32)
    crop = big[1:-1, 1:-1, 1:-1, 1:-1]
    return crop if view == "crop" else crop[::-1, :, ::-1]


@settings(max_examples=300, deadline=None)
@given(conv_calls())
def test_conv1x1_matches_reference(call):
    rng = np.random.default_rng(call["seed"])
    x = make_x(rng, call["shape"], call["x_view"])
    c, k, groups = call["shape"][3], call["k"], call["groups"]
    weight = rng.standard_normal((k, c // groups), dtype=np.float32)
    bias = rng.standard_normal(k, dtype=np.float32) if call["bias"] else None
    if call["layout"] == "NCHW":
        x = np.moveaxis(x, -1, 1)  # an NCHW view of the same data: read with its strides
    geometry = dict(stride=call["stride"], padding=call["padding"], groups=groups, layout=call["layout"])
    out_shape = pwcpu.reference.conv1x1(x, weight, **geometry).shape
    channel_axis = 1 if call["layout"] == "NCHW" else 3
    residual = rng.standard_normal(out_shape, dtype=np.float32) if call["residual"] or call["out"] == "residual" else None
    residual_values = None if residual is None else residual.copy()
    out = None
    if call["out"] == "fresh":
        out = np.empty(out_shape, np.float32)
    elif call["out"] == "slice":
        wide = list(out_shape)
        wide[channel_axis] += 5
        out = np.zeros(wide, np.float32)
        out = out[:, 2 : 2 + out_shape[1]] if channel_axis == 1 else out[..., 2 : 2 + out_shape[3]]
    elif call["out"] == "residual":
        out = residual
    _core.select_isa(call["isa"])
    try:
        with pwcpu.num_threads(call["threads"]):
            y = pwcpu.conv1x1(x, weight, bias, activation=call["activation"], residual=residual, out=out, **geometry)
    finally:
        _core.select_isa("auto")
    if out is not None:
        assert y is out
    check_conv(y, x, weight, bias, activation=call["activation"], residual=residual_values, **geometry)
