// AVX2+FMA microkernels: 8 lanes; tails through vmaskmov, used only in the epilogue and the
// depthwise kernel's channel tail.
// Compiled with -mavx2 -mfma only; called only when the CPU reports both.
#include <immintrin.h>

#include <array>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "kernels/bf16.hpp"
#include "kernels/ukernel.hpp"

namespace pwcpu::kernels {
namespace avx2 {

struct Vec {
    static constexpr char isa[] = "avx2";
    static constexpr int W = 8;
    static constexpr int kRegisters = 16;  // ymm0-15
    static constexpr bool kEmbeddedBroadcast = false;
    using R = __m256;
    static __m256i mask(size_t n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static R set1(float x) { return _mm256_set1_ps(x); }
    static R load(const float* p) { return _mm256_loadu_ps(p); }
    // A no-op: in 16 registers a depthwise run's columns spill (0.82-1.0x when kept there, measured
    // on Zen 4), and the memory operands GCC folds into the FMAs are the better use of the loads.
    static void keep_in_register(R&) {}
    // vmaskmov is microcoded on AMD cores (a masked store costs tens of cycles on Zen 2/3), so the
    // vectors a tile's tail leaves empty (a 16-wide panel holding 8 channels) skip it entirely.
    static R load_n(const float* p, size_t n) {
        if (n == W) return _mm256_loadu_ps(p);
        return n == 0 ? _mm256_setzero_ps() : _mm256_maskload_ps(p, mask(n));
    }
    static void store_n(float* p, R x, size_t n) {
        if (n == W) {
            _mm256_storeu_ps(p, x);
        } else if (n != 0) {
            _mm256_maskstore_ps(p, mask(n), x);
        }
    }
    static void store_stream_n(float* p, R x, size_t n) {
        if (n == W && reinterpret_cast<uintptr_t>(p) % 32 == 0) {
            _mm256_stream_ps(p, x);  // half a cache line; the next store completes it
        } else {
            store_n(p, x, n);
        }
    }
    static R add(R a, R b) { return _mm256_add_ps(a, b); }
    static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
    static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
    static R div(R a, R b) { return _mm256_div_ps(a, b); }
    static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
    static R max(R a, R b) { return _mm256_max_ps(a, b); }
    static R min(R a, R b) { return _mm256_min_ps(a, b); }
    static R abs(R a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
    static R low_bits_to_exponent(R a) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(a), 23)); }
    static R dup4(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
    template <int J>
    static R lane(R v) { return _mm256_permute_ps(v, J * 0x55); }
    static R select_neg(R x, R a, R b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ)); }
    // Across the 8 lanes, by halving (the order of an addition's terms is fixed: results are the same every call).
    template <class Op>
    static float reduce(R x, Op op) {
        __m128 v = op(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        v = op(v, _mm_movehl_ps(v, v));
        v = op(v, _mm_movehdup_ps(v));
        return _mm_cvtss_f32(v);
    }
    static float reduce_min(R x) { return reduce(x, [](__m128 a, __m128 b) { return _mm_min_ps(a, b); }); }
    static float reduce_max(R x) { return reduce(x, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); }); }
    static float reduce_add(R x) { return reduce(x, [](__m128 a, __m128 b) { return _mm_add_ps(a, b); }); }
};

struct IVec {
    static constexpr int kGroup = 2;  // pairs of int16, summed exactly in int32
    using A = int16_t;
    using B = int16_t;
    using P = __m256i;
    using I = __m256i;
    static I zero() { return _mm256_setzero_si256(); }
    static P load_groups(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    static P broadcast_group(const int16_t* p) {
        int32_t pair;
        std::memcpy(&pair, p, sizeof pair);
        return _mm256_set1_epi32(pair);
    }
    // The sum is added in place: written as an intrinsic, GCC adds into the product's register
    // and copies it back to the accumulator's (a move per multiply, a quarter of the loop's slots).
    static I madd_add(I acc, P a, P b) {
        const __m256i product = _mm256_madd_epi16(a, b);
        __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(product));
        return acc;
    }
    static __m256 to_float(I x) { return _mm256_cvtepi32_ps(x); }
    static I set1(int32_t x) { return _mm256_set1_epi32(x); }
    static I add(I a, I b) { return _mm256_add_epi32(a, b); }
    static I load_i32(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    static I round(__m256 x) { return _mm256_cvtps_epi32(x); }
    // The first n lanes as int16 (the values fit).
    static void store_int16(int16_t* p, I x, size_t n) {
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
        if (n == static_cast<size_t>(Vec::W)) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(p), words);
        } else {
            int16_t all[8];
            _mm_storeu_si128(reinterpret_cast<__m128i*>(all), words);
            std::memcpy(p, all, n * sizeof(int16_t));
        }
    }
    static void store_bytes(uint8_t* p, I x, size_t n, bool is_signed) {
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
        const __m128i bytes = is_signed ? _mm_packs_epi16(words, words) : _mm_packus_epi16(words, words);
        if (n == static_cast<size_t>(Vec::W)) {
            _mm_storel_epi64(reinterpret_cast<__m128i*>(p), bytes);
        } else {
            uint8_t all[16];
            _mm_storeu_si128(reinterpret_cast<__m128i*>(all), bytes);
            std::memcpy(p, all, n);
        }
    }
};

#include "kernels/f32_epilogue.inl"
#include "kernels/f32_gemm_tile.inl"
#include "kernels/fma_probe.inl"
#include "kernels/grouped_dot.inl"
#include "kernels/int8_gemm_tile.inl"
#include "kernels/f32_dwconv.inl"
#include "kernels/bf16_round.inl"

}  // namespace avx2

// 4x24 computes as fast as 6x16 on full panels (Zen 3: 84-95 GFLOP/s both) and fits layers of 24,
// 72 or 120 channels exactly; 12x8 (one weight vector per k) runs at about 0.8 of them and serves
// layers of 8 channels or fewer, in its plain and its shuffled form (see TileForm; on an Intel
// Xeon the plain one ran such layers 5-9 % faster), whichever the dispatch times faster.
const IsaKernels& avx2_kernels() {
    static const IsaKernels table{
        "avx2",
        {avx2::gemm_kernel<6, 2>(1.0f), avx2::gemm_kernel<4, 3>(1.0f),
         avx2::gemm_kernel<12, 1>(0.8f), avx2::gemm_kernel<12, 1, avx2::TileForm::shuffled>(0.75f)},
        {},
        {avx2::int8_gemm_kernel<6, 2>(1.0f)},
        avx2::quantize_rows_int8,
        avx2::widen_row_int8,
        "avx2",
        nullptr,
        {avx2::f32_dwconv_row, avx2::Vec::W, "f32_dwconv_bias_act_avx2"},
        avx2::round_to_bf16_run,
        nullptr,
        avx2::fma_peak_probe,
        avx2::kFmaChains * avx2::Vec::W,
    };
    return table;
}

}  // namespace pwcpu::kernels
