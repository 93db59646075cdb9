// The fused epilogue's activations, written once over a vector type (see f32_gemm_tile.inl for
// what each ISA's Vec provides). Included, inside the ISA's namespace, before the kernels.

#define PWCPU_INLINE inline __attribute__((always_inline))

using R = Vec::R;

PWCPU_INLINE R k(float value) { return Vec::set1(value); }

// e^z as 2^n e^t with n = round(z log2 e), |t| <= ln2 / 2 (NaN stays NaN). Adding
// 1.5 * 2^23 + 127 to z log2 e rounds it to an integer and leaves n + 127 in the low mantissa bits,
// so 2^n is those bits moved into the exponent field: no conversions. t = z - n ln2 in two parts
// (n ln2_hi is exact); e^t = 1 + t p(t), p of degree 4 fitted to the relative error on
// [-ln2/2, ln2/2]. Relative error below 1.7e-7 (2.7 ulp) on [-87.3, 88.3]. Below, z is clamped to
// -87.3 (e^z is under the normal range there). Above 88.4, n = 128 puts all ones in the exponent:
// +inf, which e^z is from 88.72 on; the callers divide by 1 + e^z, so x / (1 + e^z) is 0 (or NaN
// for infinite x) as it should be, not x / FLT_MAX.
PWCPU_INLINE R exp_approx(R z) {
    constexpr float kShift = 12583039.0f;  // 1.5 * 2^23 + 127
    z = Vec::min(k(89.0f), Vec::max(k(-87.3365478515625f), z));
    const R shifted = Vec::fma(z, k(1.44269504088896341f), k(kShift));
    const R scale = Vec::low_bits_to_exponent(shifted);
    const R n = Vec::sub(shifted, k(kShift));
    R t = Vec::fma(n, k(-0.693359375f), z);
    t = Vec::fma(n, k(2.12194440e-4f), t);
    R p = k(0x1.0fa832p-7f);
    p = Vec::fma(p, t, k(0x1.573a54p-5f));
    p = Vec::fma(p, t, k(0x1.555a6ap-3f));
    p = Vec::fma(p, t, k(0x1.fffdc6p-2f));
    p = Vec::fma(p, t, k(0x1.fffff6p-1f));
    return Vec::mul(Vec::fma(p, t, k(1.0f)), scale);  // e^t > 0, so 2^128 = inf gives inf, not NaN
}

// numerator / (1 + e^-x): sigmoid with numerator 1, SiLU with numerator x. (A reciprocal estimate
// refined by a Newton step measured slower than the divide on Zen 3: its extra steps cost more.)
PWCPU_INLINE R divide_by_one_plus_exp_neg(R numerator, R x) {
    return Vec::div(numerator, Vec::add(k(1.0f), exp_approx(Vec::sub(k(0.0f), x))));
}

// gelu(x) = x/2 * (1 + erf(x / sqrt 2)), exact erf form as PyTorch's default. erfc(|z|) comes
// from Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7); building 1 + erf from erfc keeps
// the relative accuracy for negative x, where 1 + erf is tiny.
PWCPU_INLINE R gelu(R x) {
    const R z = Vec::mul(Vec::abs(x), k(0.70710678118654752f));
    const R t = Vec::div(k(1.0f), Vec::fma(z, k(0.3275911f), k(1.0f)));
    R poly = k(1.061405429f);
    poly = Vec::fma(poly, t, k(-1.453152027f));
    poly = Vec::fma(poly, t, k(1.421413741f));
    poly = Vec::fma(poly, t, k(-0.284496736f));
    poly = Vec::fma(poly, t, k(0.254829592f));
    const R erfc_abs = Vec::mul(Vec::mul(poly, t), exp_approx(Vec::sub(k(0.0f), Vec::mul(z, z))));
    const R one_plus_erf = Vec::select_neg(x, erfc_abs, Vec::sub(k(2.0f), erfc_abs));
    return Vec::mul(Vec::mul(x, k(0.5f)), one_plus_erf);
}

template <Activation A>
PWCPU_INLINE R activate(R x) {
    if constexpr (A == Activation::relu) {
        return Vec::max(k(0.0f), x);
    } else if constexpr (A == Activation::relu6) {
        return Vec::min(k(6.0f), Vec::max(k(0.0f), x));
    } else if constexpr (A == Activation::silu) {
        return divide_by_one_plus_exp_neg(x, x);
    } else if constexpr (A == Activation::gelu) {
        return gelu(x);
    } else if constexpr (A == Activation::hardswish) {
        const R gate = Vec::min(k(6.0f), Vec::max(k(0.0f), Vec::add(x, k(3.0f))));
        return Vec::mul(x, Vec::mul(gate, k(1.0f / 6.0f)));
    } else if constexpr (A == Activation::sigmoid) {
        return divide_by_one_plus_exp_neg(k(1.0f), x);
    } else if constexpr (A == Activation::hardsigmoid) {  // relu6(x + 3) / 6, as PyTorch
        return Vec::mul(Vec::min(k(6.0f), Vec::max(k(0.0f), Vec::add(x, k(3.0f)))), k(1.0f / 6.0f));
    } else {
        return x;
    }
}

template <Activation A, int MR, int NV>
PWCPU_INLINE void activate_tile(R (&acc)[MR][NV]) {
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = activate<A>(acc[m][v]);
}

template <int MR, int NV>
PWCPU_INLINE void activate_tile(R (&acc)[MR][NV], Activation act) {
    switch (act) {
        case Activation::none: break;
        case Activation::relu: activate_tile<Activation::relu>(acc); break;
        case Activation::relu6: activate_tile<Activation::relu6>(acc); break;
        case Activation::silu: activate_tile<Activation::silu>(acc); break;
        case Activation::gelu: activate_tile<Activation::gelu>(acc); break;
        case Activation::hardswish: activate_tile<Activation::hardswish>(acc); break;
        case Activation::sigmoid: activate_tile<Activation::sigmoid>(acc); break;
        case Activation::hardsigmoid: activate_tile<Activation::hardsigmoid>(acc); break;
    }
}
