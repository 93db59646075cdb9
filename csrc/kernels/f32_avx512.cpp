// AVX-512F microkernels: 16 lanes, native lane masks for the tails, embedded broadcasts.
// Compiled with -mavx512f (and friends) only; called only when the CPU reports AVX-512F.
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <utility>

#include "kernels/bf16.hpp"
#include "kernels/ukernel.hpp"

namespace pwcpu::kernels {
namespace avx512 {

struct Vec {
    static constexpr char isa[] = "avx512";
    static constexpr int W = 16;
    using R = __m512;
    static __mmask16 mask(size_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
    static R set1(float x) { return _mm512_set1_ps(x); }
    static R load(const float* p) { return _mm512_loadu_ps(p); }
    // W bfloat16 values widened to float: each one's bits moved to the top half of a lane.
    static R load_bf16(const uint16_t* p) {
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    static R load_n(const float* p, size_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
    static void store_n(float* p, R x, size_t n) { _mm512_mask_storeu_ps(p, mask(n), x); }
    static void store_stream_n(float* p, R x, size_t n) {
        if (n == W && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
            _mm512_stream_ps(p, x);  // a whole cache line
        } else {
            store_n(p, x, n);
        }
    }
    static R add(R a, R b) { return _mm512_add_ps(a, b); }
    static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
    static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
    static R div(R a, R b) { return _mm512_div_ps(a, b); }
    static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
    static R max(R a, R b) { return _mm512_max_ps(a, b); }
    static R min(R a, R b) { return _mm512_min_ps(a, b); }
    static R abs(R a) { return _mm512_abs_ps(a); }
    static R low_bits_to_exponent(R a) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(a), 23)); }
    static R dup4(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
    template <int J>
    static R lane(R v) { return _mm512_permute_ps(v, J * 0x55); }
    static R select_neg(R x, R a, R b) {
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), b, a);
    }
};

#include "kernels/f32_epilogue.inl"
#include "kernels/f32_gemm_tile.inl"
#include "kernels/f32_dwconv.inl"
#include "kernels/bf16_round.inl"

}  // namespace avx512

const IsaKernels& avx512_kernels() {
    static const IsaKernels table{
        "avx512",
        {avx512::gemm_kernel<14, 2>(1.0f), avx512::gemm_kernel<14, 1>(0.8f)},
        {avx512::gemm_kernel<14, 2, uint16_t>(1.0f), avx512::gemm_kernel<14, 1, uint16_t>(0.8f)},
        avx2_kernels().gemm_int8,
        avx2_kernels().quantize_rows_int8,
        avx2_kernels().widen_row_int8,
        avx2_kernels().int8_isa,
        {avx512::f32_dwconv_row, avx512::Vec::W, "f32_dwconv_bias_act_avx512"},
        avx512::round_to_bf16_run,
        avx512::fma_peak_probe,
        avx512::kFmaChains * avx512::Vec::W,
    };
    return table;
}

}  // namespace pwcpu::kernels
