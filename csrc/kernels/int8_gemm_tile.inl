// The int8 GEMM tile microkernel (dynamic quantization) and the row quantizer that feeds it,
// written once over the ISA's Vec (floats) and IVec (integers).
//
// Included inside the ISA's namespace after f32_gemm_tile.inl (whose store_tile it shares) and
// grouped_dot.inl (its k loop). IVec is a Dot (see grouped_dot.inl) summing exactly in int32,
// either of pairs of int16 values t (vpmaddwd + vpaddd; kGroup 2) or of quads of unsigned bytes
// u = t + z, z the row's zero point (vpdpbusd; kGroup 4), with zero(), to_float(I), set1, add,
// load_i32(p), and for quads sub and mullo; for static int8 round(R) (to nearest even, as
// cvtps2dq) and store_bytes(p, I, n, is_signed) (the first n lanes, within the type's range).

// Static int8's end of a tile: the sums plus the int32 bias, requantized as ONNX Runtime does (in
// float32: multiply, clamp to the output's range less its zero point, round to nearest even, add
// the zero point), stored as bytes.
template <int MR, int NV>
PWCPU_INLINE void requantize_tile(const typename IVec::I (&sums)[MR][NV], const GemmTileArgs& p) {
    constexpr int W = Vec::W;
    size_t lanes[NV];
    valid_lanes(p.nr, lanes);
    const R low = Vec::set1(p.out_min), high = Vec::set1(p.out_max);
    const typename IVec::I zero_point = IVec::set1(p.out_zero_point);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
        const typename IVec::I bias = IVec::load_i32(p.bias_int32 + v * W);
        const R scale = Vec::load(p.col_scale + v * W);
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) {
            const R scaled = Vec::mul(IVec::to_float(IVec::add(sums[m][v], bias)), scale);
            const typename IVec::I q = IVec::round(Vec::min(high, Vec::max(low, scaled)));
            IVec::store_bytes(p.c_quantized[m] + p.col + v * W, IVec::add(q, zero_point), lanes[v], p.out_signed);
        }
    }
}

// Quads: the sums of u * w less each row's zero point times each column's weight sum.
template <class Quads, int MR, int NV>
PWCPU_INLINE void subtract_zero_points(typename Quads::I (&sums)[MR][NV], const GemmTileArgs& p) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
        const typename Quads::I column_sum = Quads::load_i32(p.col_sums + v * Vec::W);
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) {
            sums[m][v] = Quads::sub(sums[m][v], Quads::mullo(Quads::set1(p.row_zero_point[m]), column_sum));
        }
    }
}

// Values less their zero point lie in [-255, 255] and weights in [-127, 127], so a pair's two
// products sum to at most 64770 in magnitude: exact in int32 (no int16 saturation, unlike
// vpmaddubsw) for reductions of up to 33000 pairs; the driver admits at most 65536 channels.
// Quads: each product of an unsigned byte and a weight is at most 32385 in magnitude, so the sum
// over 65536 channels, and the zero point (at most 255) times a column's weight sum, stay within
// int32, and their difference is the sum of the values less their zero point, exactly.
template <int MR, int NV>
PWCPU_INLINE void finish_int8_tile(typename IVec::I (&sums)[MR][NV], const GemmTileArgs& p);

template <int MR, int NV>
void int8_gemm_tile(const GemmTileArgs& p) {
    typename IVec::I sums[MR][NV];
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) sums[m][v] = IVec::zero();
    grouped_dot_loop<MR, NV, IVec>(p, sums);
    finish_int8_tile<MR, NV>(sums, p);
}

// A tile's end from its exact sums (of u * w for quads): the zero points taken out, then
// requantized (static int8) or dequantized with bias, residual and activation.
template <int MR, int NV>
PWCPU_INLINE void finish_int8_tile(typename IVec::I (&sums)[MR][NV], const GemmTileArgs& p) {
    constexpr int W = Vec::W;
    if constexpr (IVec::kGroup == 4) subtract_zero_points<IVec, MR, NV>(sums, p);
    if (p.c_quantized != nullptr) {
        requantize_tile<MR, NV>(sums, p);
        return;
    }
    R acc[MR][NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
        const R col_scale = Vec::load(p.col_scale + v * W), bias = Vec::load(p.bias + v * W);
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) {
            const R scale = Vec::mul(Vec::set1(p.row_scale[m]), col_scale);
            acc[m][v] = Vec::fma(IVec::to_float(sums[m][v]), scale, bias);
        }
    }
    store_tile<MR, NV>(acc, p);
}

template <int NV, int... R>
constexpr std::array<GemmTileFn, sizeof...(R)> int8_tiles_by_rows(std::integer_sequence<int, R...>) {
    return {{&int8_gemm_tile<R + 1, NV>...}};
}

// The int8 kernel of MR x (NV vectors) tiles, named like the float ones.
template <int MR, int NV>
GemmKernel int8_gemm_kernel(float throughput) {
    static constexpr std::array<GemmTileFn, MR> tiles = int8_tiles_by_rows<NV>(std::make_integer_sequence<int, MR>{});
    static constexpr KernelName name = gemm_kernel_name<MR, NV * Vec::W>("int8_f32_gemm_bias_act_");
    return {tiles.data(), MR, NV * Vec::W, name.data(), throughput, IVec::kGroup};
}

// A row's quantized values, the first n lanes of v: bytes for quads, int16 for pairs.
template <class Ints>
PWCPU_INLINE void store_quantized(uint8_t* p, typename Ints::I v, size_t n) {
    Ints::store_bytes(p, v, n, false);
}
template <class Ints>
PWCPU_INLINE void store_quantized(int16_t* p, typename Ints::I v, size_t n) {
    Ints::store_int16(p, v, n);
}

// See QuantizeRowsFn (ukernel.hpp). Rows go through in batches: each row's range is reduced in
// vectors (Vec's reduce_min, reduce_max and reduce_add end it), then the batch's scales, inverses
// and zero points come from vector operations over the batch, so that the rows' reductions and
// divisions overlap rather than each row waiting on its own (on narrow layers, C = 16-32, that wait
// took as long as the multiply-adds). The values in vectors, clamped to the 256 levels and rounded
// to nearest even (GCC had left the loop scalar: a third of 8x56x56x24->144's time on Zen 4).
void quantize_rows_int8(const float* const* src, ptrdiff_t offset, size_t rows, size_t n, void* dst,
                        size_t dst_stride, size_t padded, float* scales, int32_t* zero_points) {
    using Value = std::conditional_t<IVec::kGroup == 4, uint8_t, int16_t>;  // u = t + z, or t
    constexpr int W = Vec::W;
    constexpr size_t kBatch = W < 8 ? 8 : W;  // a whole number of vectors
    constexpr float kRound = 12582912.0f;     // 1.5 * 2^23
    for (size_t r0 = 0; r0 < rows; r0 += kBatch) {
        const size_t count = std::min(kBatch, rows - r0);
        // Rows past the end get the range [0, 1]: their lanes compute, unused.
        alignas(64) float row_min[kBatch] = {}, row_max[kBatch], check[kBatch] = {};
        std::fill(row_max, row_max + kBatch, 1.0f);
        for (size_t r = 0; r < count; ++r) {
            const float* row = src[r0 + r] + offset;
            R lo = Vec::set1(0.0f), hi = lo, not_finite = lo;
            size_t i = 0;
            for (; i + W <= n; i += W) {
                const R x = Vec::load(row + i);
                lo = Vec::min(lo, x);
                hi = Vec::max(hi, x);
                not_finite = Vec::add(not_finite, Vec::sub(x, x));  // NaN from a NaN or an infinity, then kept
            }
            if (i < n) {
                const R x = Vec::load_n(row + i, n - i);
                lo = Vec::min(lo, x);
                hi = Vec::max(hi, x);
                not_finite = Vec::add(not_finite, Vec::sub(x, x));
            }
            row_min[r] = Vec::reduce_min(lo);
            row_max[r] = Vec::reduce_max(hi);
            check[r] = Vec::reduce_add(not_finite);
        }
        alignas(64) float scale[kBatch], inverse[kBatch], low[kBatch], high[kBatch];
        for (size_t j = 0; j < kBatch; j += W) {
            const R lowest = Vec::load(row_min + j), range = Vec::sub(Vec::load(row_max + j), lowest);
            const R steps = Vec::set1(255.0f), round = Vec::set1(kRound), min_level = Vec::set1(-128.0f),
                    max_level = Vec::set1(127.0f);
            // The zero point: -128 - row_min / scale, rounded, within the int8 range.
            const R inv = Vec::div(steps, range);
            const R zero_point = Vec::min(
                max_level, Vec::max(Vec::sub(Vec::add(Vec::sub(min_level, Vec::mul(lowest, inv)), round), round), min_level));
            Vec::store_n(scale + j, Vec::div(range, steps), W);
            Vec::store_n(inverse + j, inv, W);
            Vec::store_n(low + j, Vec::sub(min_level, zero_point), W);
            Vec::store_n(high + j, Vec::sub(max_level, zero_point), W);
        }
        for (size_t r = 0; r < count; ++r) {
            Value* const out = static_cast<Value*>(dst) + (r0 + r) * dst_stride;
            if constexpr (IVec::kGroup == 4) zero_points[r0 + r] = 0;
            // A row of zeros, or of values too small to tell apart (a scale under the normal range
            // would be flushed to zero), quantizes to zeros; a row with a NaN or an infinity gives NaN
            // outputs.
            if (check[r] != 0.0f || !(scale[r] >= 1.17549435e-38f)) {
                std::fill(out, out + padded, Value{0});
                scales[r0 + r] = check[r] != 0.0f ? check[r] : 0.0f;
                continue;
            }
            const float* row = src[r0 + r] + offset;
            const float inv = inverse[r], lowest = low[r], highest = high[r];
            // Quads: the values plus z = -lowest (an integer), so from 0 to 255.
            const float shift = IVec::kGroup == 4 ? -lowest : 0.0f;
            const R scale_by = Vec::set1(inv), floor = Vec::set1(lowest), ceiling = Vec::set1(highest);
            const typename IVec::I shift_by = IVec::set1(static_cast<int32_t>(shift));
            for (size_t j = 0; j < n; j += W) {
                const size_t lanes = std::min<size_t>(W, n - j);
                const R x = lanes == W ? Vec::load(row + j) : Vec::load_n(row + j, lanes);
                const R t = Vec::min(Vec::max(Vec::mul(x, scale_by), floor), ceiling);
                const typename IVec::I value = IVec::add(IVec::round(t), shift_by);
                store_quantized<IVec>(out + j, value, lanes);
            }
            std::fill(out + n, out + padded, Value{0});
            if constexpr (IVec::kGroup == 4) zero_points[r0 + r] = static_cast<int32_t>(shift);
            scales[r0 + r] = scale[r];
        }
    }
}

// See WidenRowFn (ukernel.hpp).
void widen_row_int8(const uint8_t* src, size_t n, bool is_signed, int32_t zero_point, void* dst_values, size_t padded) {
    if constexpr (IVec::kGroup == 4) {
        uint8_t* const dst = static_cast<uint8_t*>(dst_values);
        for (size_t j = 0; j < n; ++j) dst[j] = is_signed ? static_cast<uint8_t>(src[j] ^ 0x80u) : src[j];
        std::fill(dst + n, dst + padded, uint8_t{0});
        return;
    }
    int16_t* const dst = static_cast<int16_t*>(dst_values);
    const int16_t offset = static_cast<int16_t>(zero_point);
    if (is_signed) {
        const int8_t* values = reinterpret_cast<const int8_t*>(src);
        for (size_t j = 0; j < n; ++j) dst[j] = static_cast<int16_t>(values[j] - offset);
    } else {
        for (size_t j = 0; j < n; ++j) dst[j] = static_cast<int16_t>(src[j] - offset);
    }
    for (size_t j = n; j < padded; ++j) dst[j] = 0;
}
