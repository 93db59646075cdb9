"""Comparison against pwcpu.reference with a stated error bound.

For one output, float32 accumulation of the Cg products plus bias and residual (in any order, with
or without FMA) is off the exact value by at most gamma(Cg + 2) * (sum_c |x_c w_c| + |b| + |r|),
gamma(n) = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability, 3.1). An activation with
Lipschitz constant <= 1.5 carries that error over, and the nonlinear ones (computed with exp and
erf approximations) add at most 4e-7 (|z| + 1) of their own. Flushing denormals adds < 1e-30.
"""

import numpy as np

from pwcpu import reference

UNIT_ROUNDOFF = 2.0**-24
PIECEWISE_LINEAR = {None, "relu", "relu6"}


def gamma(n):
    return n * UNIT_ROUNDOFF / (1.0 - n * UNIT_ROUNDOFF)


def conv_bound(x, weight, bias=None, *, stride=1, padding=0, groups=1, activation=None, residual=None,
               layout="NHWC", precision="fp32"):
    """(expected, tolerance) for conv1x1 under the bound above. With precision "bf16" the reference
    reads x and weight rounded to bfloat16, as pwcpu does: their products are exact in float32, so
    the same bound on the float32 sum applies. With "int8" it reads the quantized values times
    their scales: pwcpu's integer sums are exact, and only the few roundings of dequantization
    (the sum's conversion, the two scales' product, the multiply, bias and residual) remain."""
    w = np.asarray(weight).reshape(np.shape(weight)[0], np.shape(weight)[1])
    if precision == "int8":
        x, w = _int8_inputs(x, w, groups, layout)
        geometry = dict(stride=stride, padding=padding, groups=groups, layout=layout)
        z = reference.conv1x1(x, w, bias, residual=residual, **geometry)
        magnitude = reference.conv1x1(np.abs(x), np.abs(w), None if bias is None else np.abs(bias),
                                      residual=None if residual is None else np.abs(residual), **geometry)
        return _finish(z, magnitude, INT8_ROUNDINGS, activation)
    geometry = dict(stride=stride, padding=padding, groups=groups, layout=layout, precision=precision)
    z = reference.conv1x1(x, w, bias, residual=residual, **geometry)
    magnitude = reference.conv1x1(np.abs(x), np.abs(w), None if bias is None else np.abs(bias),
                                  residual=None if residual is None else np.abs(residual), **geometry)
    return _finish(z, magnitude, w.shape[1], activation)


def pointwise_bound(x, weight, bias=None, *, activation=None, residual=None, precision="fp32"):
    if precision == "int8":
        x, weight = _int8_inputs(x, weight, 1, "NHWC")
        z = reference.pointwise(x, weight, bias, residual=residual)
        magnitude = reference.pointwise(np.abs(x), np.abs(weight), None if bias is None else np.abs(bias),
                                        residual=None if residual is None else np.abs(residual))
        return _finish(z, magnitude, INT8_ROUNDINGS, activation)
    z = reference.pointwise(x, weight, bias, residual=residual, precision=precision)
    magnitude = reference.pointwise(np.abs(x), np.abs(weight), None if bias is None else np.abs(bias),
                                    residual=None if residual is None else np.abs(residual), precision=precision)
    return _finish(z, magnitude, np.shape(weight)[1], activation)


def depthwise_bound(x, weight, bias=None, *, stride=1, padding=0, activation=None, residual=None):
    """(expected, tolerance) for depthwise_conv2d: a sum of kh * kw products per output."""
    w = np.asarray(weight)
    geometry = dict(stride=stride, padding=padding)
    z = reference.depthwise_conv2d(x, w, bias, residual=residual, **geometry)
    magnitude = reference.depthwise_conv2d(np.abs(x), np.abs(w), None if bias is None else np.abs(bias),
                                           residual=None if residual is None else np.abs(residual), **geometry)
    return _finish(z, magnitude, w.shape[-1] * w.shape[-2], activation)


def dense_bound(x, weight, bias=None, *, stride=1, padding=0, groups=1, activation=None, residual=None):
    """(expected, tolerance) for conv2d: a sum of C / groups * kh * kw products per output."""
    w = np.asarray(weight)
    geometry = dict(stride=stride, padding=padding, groups=groups)
    z = reference.conv2d(x, w, bias, residual=residual, **geometry)
    magnitude = reference.conv2d(np.abs(x), np.abs(w), None if bias is None else np.abs(bias),
                                 residual=None if residual is None else np.abs(residual), **geometry)
    return _finish(z, magnitude, w.shape[1] * w.shape[2] * w.shape[3], activation)


# int8: the roundings after the exact integer sum, as a count of float32 additions for gamma().
INT8_ROUNDINGS = 4


def _int8_inputs(x, weight, groups, layout):
    """x and weight as precision="int8" reads them (quantized values times scales), float64."""
    if layout == "NCHW":
        xq, wq = reference.int8_operands(np.moveaxis(np.asarray(x), 1, -1), weight, groups)
        return np.moveaxis(xq, -1, 1), wq
    return reference.int8_operands(x, weight, groups)


@np.errstate(all="ignore")  # infinite inputs give infinite bounds, quietly
def _finish(z, magnitude, cg, activation):
    expected = reference.ACTIVATION_FUNCTIONS[activation](z)
    tolerance = 1.5 * gamma(cg + 2) * magnitude + 1e-30
    # Partial sums may overflow float32 where sum |x w| does: no bound applies there.
    tolerance = np.where(magnitude < np.finfo(np.float32).max, tolerance, np.inf)
    if activation not in PIECEWISE_LINEAR:
        tolerance = tolerance + 4e-7 * (np.abs(z) + 1.0)
    return expected, tolerance


def assert_within(actual, expected, tolerance, context=""):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == np.float32
    error = np.abs(actual.astype(np.float64) - expected)
    bad = ~(error <= tolerance)  # NaN counts as bad
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(
            f"{context}: {int(bad.sum())} of {bad.size} outputs out of bound; first at {i}: "
            f"got {actual[i]!r}, expected {expected[i]!r}, bound {tolerance[i]!r}"
        )


def check_conv(actual, x, weight, bias=None, context="", **kwargs):
    expected, tolerance = conv_bound(x, weight, bias, **kwargs)
    assert_within(actual, expected, tolerance, context or repr(kwargs))


def randn(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)
