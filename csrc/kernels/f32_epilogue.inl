// The fused epilogue's activations, written once over a vector type (see f32_gemm_tile.inl for
// what each ISA's Vec provides). Included, inside the ISA's namespace, before the kernels.

#define PWCPU_INLINE inline __attribute__((always_inline))

using R = Vec::R;

PWCPU_INLINE R k(float value) { return Vec::set1(value); }

// exp(x) after Cephes' expf: range reduction by ln2 in two parts and a degree-6 polynomial.
// Relative error ~1.5 ulp. Inputs are clamped to the range where 2^n stays a normal number.
PWCPU_INLINE R exp_approx(R x) {
    x = Vec::min(k(88.3762626647949f), Vec::max(k(-87.3365478515625f), x));
    const R n = Vec::round(Vec::mul(x, k(1.44269504088896341f)));
    R r = Vec::fma(n, k(-0.693359375f), x);
    r = Vec::fma(n, k(2.12194440e-4f), r);
    R p = k(1.9875691500e-4f);
    p = Vec::fma(p, r, k(1.3981999507e-3f));
    p = Vec::fma(p, r, k(8.3334519073e-3f));
    p = Vec::fma(p, r, k(4.1665795894e-2f));
    p = Vec::fma(p, r, k(1.6666665459e-1f));
    p = Vec::fma(p, r, k(5.0000001201e-1f));
    p = Vec::fma(p, Vec::mul(r, r), Vec::add(r, k(1.0f)));
    return Vec::mul(p, Vec::pow2(n));
}

PWCPU_INLINE R sigmoid(R x) {
    return Vec::div(k(1.0f), Vec::add(k(1.0f), exp_approx(Vec::sub(k(0.0f), x))));
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
        return Vec::mul(x, sigmoid(x));
    } else if constexpr (A == Activation::gelu) {
        return gelu(x);
    } else if constexpr (A == Activation::hardswish) {
        const R gate = Vec::min(k(6.0f), Vec::max(k(0.0f), Vec::add(x, k(3.0f))));
        return Vec::mul(x, Vec::mul(gate, k(1.0f / 6.0f)));
    } else if constexpr (A == Activation::sigmoid) {
        return sigmoid(x);
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
    }
}

