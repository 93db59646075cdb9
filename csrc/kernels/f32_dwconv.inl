// The f32 depthwise-convolution microkernel, written once over a vector type (see
// f32_gemm_tile.inl for what each ISA's Vec provides; f32_epilogue.inl comes first).

// Every output pixel of the run, all channels: kDwBlocks channel vectors at a time, each with its
// own accumulator, so that the taps' multiply-adds of one vector do not wait on each other.
constexpr int kDwBlocks = 4;

template <int B>
PWCPU_INLINE void dw_blocks(const DwRowArgs& p, size_t pixel, size_t c, size_t lanes) {
    constexpr int W = Vec::W;
    const size_t taps = p.taps;
    const ptrdiff_t shift = static_cast<ptrdiff_t>(pixel) * p.input_step + static_cast<ptrdiff_t>(c);
    const float* w = p.w + (c / W) * (1 + taps) * W;  // this block's W biases, then taps x W weights
    const size_t block_stride = (1 + taps) * W;
    R acc[1][B];  // one pixel's row of vectors, as the epilogue takes tiles
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) acc[0][b] = Vec::load(w + b * block_stride);
    for (size_t t = 0; t < taps; ++t) {
        const float* x = p.input[t] + shift;
        const float* wt = w + (1 + t) * W;
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) {
            const R xv = lanes == static_cast<size_t>(W) ? Vec::load(x + b * W) : Vec::load_n(x + b * W, lanes);
            acc[0][b] = Vec::fma(xv, Vec::load(wt + b * block_stride), acc[0][b]);
        }
    }
    float* out = p.out + static_cast<ptrdiff_t>(pixel) * p.out_step + static_cast<ptrdiff_t>(c);
    const float* res = p.residual != nullptr ? p.residual + static_cast<ptrdiff_t>(pixel) * p.residual_step + static_cast<ptrdiff_t>(c) : nullptr;
    if (res != nullptr) {
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b) acc[0][b] = Vec::add(acc[0][b], Vec::load_n(res + b * W, lanes));
    }
    activate_tile<1, B>(acc, p.act);
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) Vec::store_n(out + b * W, acc[0][b], lanes);
}

void f32_dwconv_row(const DwRowArgs& p) {
    constexpr size_t W = Vec::W;
    const size_t full = p.channels / W * W;
    for (size_t pixel = 0; pixel < p.pixels; ++pixel) {
        size_t c = 0;
        for (; c + kDwBlocks * W <= full; c += kDwBlocks * W) dw_blocks<kDwBlocks>(p, pixel, c, W);
        for (; c < full; c += W) dw_blocks<1>(p, pixel, c, W);
        if (c < p.channels) dw_blocks<1>(p, pixel, c, p.channels - c);
    }
}
