// The f32 depthwise-convolution microkernel, written once over a vector type (see
// f32_gemm_tile.inl for what each ISA's Vec provides; f32_epilogue.inl comes first).

// P pixels x B channel vectors at once, each with its own accumulator: the taps' multiply-adds
// of one vector do not wait on each other, and each weight vector loaded serves P pixels (a tap
// costs P + 1 loads per P multiply-adds instead of 2 per 1: the kernel is bound by loads).
template <int P, int B>
PWCPU_INLINE void dw_tile(const DwRowArgs& p, size_t pixel, size_t c, size_t lanes) {
    constexpr int W = Vec::W;
    const size_t taps = p.taps;
    const float* w = p.w + (c / W) * (1 + taps) * W;  // this block's W biases, then taps x W weights
    const size_t block_stride = (1 + taps) * W;
    const ptrdiff_t shift = static_cast<ptrdiff_t>(pixel) * p.input_step + static_cast<ptrdiff_t>(c);
    R acc[P][B];
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
        const R bias = Vec::load(w + b * block_stride);
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) acc[q][b] = bias;
    }
    for (size_t t = 0; t < taps; ++t) {
        const float* x = p.input[t] + shift;
        const float* wt = w + (1 + t) * W;
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) {
            const R wv = Vec::load(wt + b * block_stride);
#pragma GCC unroll 4
            for (int q = 0; q < P; ++q) {
                const float* xq = x + q * p.input_step + b * W;
                const R xv = lanes == static_cast<size_t>(W) ? Vec::load(xq) : Vec::load_n(xq, lanes);
                acc[q][b] = Vec::fma(xv, wv, acc[q][b]);
            }
        }
    }
    if (p.residual != nullptr) {
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) {
            const float* res = p.residual + static_cast<ptrdiff_t>(pixel + q) * p.residual_step + static_cast<ptrdiff_t>(c);
#pragma GCC unroll 4
            for (int b = 0; b < B; ++b) acc[q][b] = Vec::add(acc[q][b], Vec::load_n(res + b * W, lanes));
        }
    }
    activate_tile<P, B>(acc, p.act);
#pragma GCC unroll 4
    for (int q = 0; q < P; ++q) {
        float* out = p.out + static_cast<ptrdiff_t>(pixel + q) * p.out_step + static_cast<ptrdiff_t>(c);
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) Vec::store_n(out + b * W, acc[q][b], lanes);
    }
}

// Every channel of pixels [pixel, pixel + P): B vectors at a time, then single vectors, then the tail.
template <int P, int B>
PWCPU_INLINE void dw_pixels(const DwRowArgs& p, size_t pixel) {
    constexpr size_t W = Vec::W;
    const size_t full = p.channels / W * W;
    size_t c = 0;
    for (; c + B * W <= full; c += B * W) dw_tile<P, B>(p, pixel, c, W);
    for (; c < full; c += W) dw_tile<P, 1>(p, pixel, c, W);
    if (c < p.channels) dw_tile<P, 1>(p, pixel, c, p.channels - c);
}

// Regular taps (see DwRowArgs) of a KW-wide filter at horizontal stride S: pixel q's tap (i, j)
// reads column q * S + j of the filter's row i, so P pixels read (P - 1) * S + KW columns of each
// row. Each column is loaded once and multiplied by every weight that meets it: KW * P
// multiply-adds for (P - 1) * S + 2 * KW loads, where dw_tile loads P + 1 per P.
template <int P, int S, int KW>
PWCPU_INLINE void dw_tile_columns(const DwRowArgs& p, size_t pixel, size_t c, size_t lanes) {
    constexpr int W = Vec::W, kColumns = (P - 1) * S + KW;
    const size_t rows = p.taps / KW;
    const float* w = p.w + (c / W) * (1 + p.taps) * W;
    const ptrdiff_t shift = static_cast<ptrdiff_t>(pixel) * p.input_step + static_cast<ptrdiff_t>(c);
    R acc[P][1];
    const R bias = Vec::load(w);
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) acc[q][0] = bias;
    for (size_t i = 0; i < rows; ++i) {
        const float* x = p.input[i * KW] + shift;
        R wv[KW];
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) wv[j] = Vec::load(w + (1 + i * KW + j) * W);
#pragma GCC unroll 32
        for (int u = 0; u < kColumns; ++u) {
            const float* xu = x + u * p.tap_step;
            R xv = lanes == static_cast<size_t>(W) ? Vec::load(xu) : Vec::load_n(xu, lanes);
            Vec::keep_in_register(xv);  // loaded once for every weight that meets it
#pragma GCC unroll 8
            for (int q = 0; q < P; ++q) {
                const int j = u - q * S;
                if (j >= 0 && j < KW) acc[q][0] = Vec::fma(xv, wv[j], acc[q][0]);
            }
        }
    }
    if (p.residual != nullptr) {
#pragma GCC unroll 8
        for (int q = 0; q < P; ++q) {
            const float* res = p.residual + static_cast<ptrdiff_t>(pixel + q) * p.residual_step + static_cast<ptrdiff_t>(c);
            acc[q][0] = Vec::add(acc[q][0], Vec::load_n(res, lanes));
        }
    }
    activate_tile<P, 1>(acc, p.act);
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) {
        Vec::store_n(p.out + static_cast<ptrdiff_t>(pixel + q) * p.out_step + static_cast<ptrdiff_t>(c), acc[q][0], lanes);
    }
}

template <int P, int S, int KW>
PWCPU_INLINE void dw_pixels_columns(const DwRowArgs& p, size_t pixel) {
    constexpr size_t W = Vec::W;
    size_t c = 0;
    for (; c + W <= p.channels; c += W) dw_tile_columns<P, S, KW>(p, pixel, c, W);
    if (c < p.channels) dw_tile_columns<P, S, KW>(p, pixel, c, p.channels - c);
}

// Runs of 8 pixels, then the 1-7 left over as one tile.
template <int S, int KW>
void dw_row_columns(const DwRowArgs& p) {
    size_t pixel = 0;
    for (; pixel + 8 <= p.pixels; pixel += 8) dw_pixels_columns<8, S, KW>(p, pixel);
    switch (p.pixels - pixel) {
        case 7: dw_pixels_columns<7, S, KW>(p, pixel); break;
        case 6: dw_pixels_columns<6, S, KW>(p, pixel); break;
        case 5: dw_pixels_columns<5, S, KW>(p, pixel); break;
        case 4: dw_pixels_columns<4, S, KW>(p, pixel); break;
        case 3: dw_pixels_columns<3, S, KW>(p, pixel); break;
        case 2: dw_pixels_columns<2, S, KW>(p, pixel); break;
        case 1: dw_pixels_columns<1, S, KW>(p, pixel); break;
        default: break;
    }
}

// Runs of 4 pixels, then the 1-3 left over as one tile: a pixel alone loads a weight vector per
// multiply-add, twice the loads per multiply-add of a run (short rows, 7x7 and 14x14 maps, are
// mostly such leftovers). Regular 3x3 and 5x5 filters at stride 1 or 2 (MobileNet's and
// EfficientNet's) reuse columns instead, on the SIMD ISAs: unrolled over the portable unit's arrays
// of 4 floats, the column form multiplied that unit's compile time (2.5x, far more under the
// sanitizers) for a speed nobody relies on.
void f32_dwconv_row(const DwRowArgs& p) {
    if constexpr (Vec::W >= 8) {
        if (p.kernel_w == 3 && p.stride_w == 1) return dw_row_columns<1, 3>(p);
        if (p.kernel_w == 5 && p.stride_w == 1) return dw_row_columns<1, 5>(p);
        if (p.kernel_w == 5 && p.stride_w == 2) return dw_row_columns<2, 5>(p);
    }
    size_t pixel = 0;
    for (; pixel + 4 <= p.pixels; pixel += 4) dw_pixels<4, 2>(p, pixel);
    switch (p.pixels - pixel) {
        case 3: dw_pixels<3, 2>(p, pixel); break;
        case 2: dw_pixels<2, 3>(p, pixel); break;
        case 1: dw_pixels<1, 4>(p, pixel); break;
        default: break;
    }
}
