// AVX-512 with AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later): the
// AVX-512F unit's kernels, except bf16, whose tiles multiply pairs of channels with vdpbf16ps.
// Compiled with -mavx512bf16 (and AVX-512F's flags) only; called only when the CPU reports it.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "kernels/bf16.hpp"
#include "kernels/ukernel.hpp"

namespace pwcpu::kernels {
namespace avx512bf16 {

constexpr char kUnitIsa[] = "avx512bf16";
#include "kernels/avx512_vec.inl"

struct Bf16Dot {
    static constexpr int kGroup = 2;  // pairs of bfloat16 (their bits), summed in float32
    using A = int16_t;
    using B = int16_t;
    using P = __m512bh;
    using I = __m512;
    static P load_groups(const int16_t* p) { return (P)_mm512_loadu_si512(p); }
    static P broadcast_group(const int16_t* p) {
        int32_t pair;
        std::memcpy(&pair, p, sizeof pair);
        return (P)_mm512_set1_epi32(pair);
    }
    static I madd_add(I acc, P a, P b) { return _mm512_dpbf16_ps(acc, a, b); }
};

#include "kernels/f32_epilogue.inl"
#include "kernels/f32_gemm_tile.inl"
#include "kernels/grouped_dot.inl"
#include "kernels/bf16_pair_gemm_tile.inl"

// See RoundRowsFn (ukernel.hpp): 32 values per vcvtne2ps2bf16, which rounds to nearest even as
// round_to_bf16 does, and quiets NaNs alike; it takes denormal inputs as zeros, as vdpbf16ps would
// take the denormal bfloat16 values round_to_bf16 gives (and as every call's DAZ mode does).
// Lanes past n load as zeros: the pair padding.
void round_rows_to_bf16_pairs(const float* const* src, ptrdiff_t offset, size_t rows, size_t n, int16_t* dst,
                              size_t dst_stride, size_t padded) {
    for (size_t r = 0; r < rows; ++r) {
        const float* row = src[r] + offset;
        int16_t* out = dst + r * dst_stride;
        for (size_t j = 0; j < padded; j += 32) {
            const size_t left = n > j ? n - j : 0;
            const __m512 low = Vec::load_n(row + j, std::min<size_t>(left, 16));
            const __m512 high = Vec::load_n(row + j + 16, left > 16 ? std::min<size_t>(left - 16, 16) : 0);
            const __m512i bits = (__m512i)_mm512_cvtne2ps_pbh(high, low);
            const size_t count = std::min<size_t>(padded - j, 32);
            _mm512_mask_storeu_epi16(out + j, static_cast<__mmask32>(count == 32 ? ~0u : (1u << count) - 1u), bits);
        }
    }
}

}  // namespace avx512bf16

const IsaKernels& avx512bf16_kernels() {
    static const IsaKernels table = [] {
        IsaKernels t = avx512_kernels();
        t.isa = "avx512bf16";
        // 8x48 (24 accumulators, 8 row pointers, none spilled) where its width pads no more than
        // 14x32's, and where it pads less (144, 240 and 40 output channels): on AMD Zen 4, 1 thread,
        // bfloat16 arrays, as fast as 14x32 on deep layers and 1.06-1.08x on shallow ones at equal
        // width (112x112x16->96, 28x28x32->192), 1.17x on 56x56x24->144.
        t.gemm_bf16 = {avx512bf16::bf16_pair_gemm_kernel<14, 2>(1.0f),
                       avx512bf16::bf16_pair_gemm_kernel<14, 1>(0.8f),
                       avx512bf16::bf16_pair_gemm_kernel<8, 3>(1.05f)};
        t.round_rows_to_bf16_pairs = avx512bf16::round_rows_to_bf16_pairs;
        return t;
    }();
    return table;
}

}  // namespace pwcpu::kernels
