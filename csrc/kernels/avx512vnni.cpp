// AVX-512 with VNNI (AMD Zen 4 and later, Intel Cascade Lake and later): the AVX-512F unit's
// kernels, except int8, whose tiles multiply quads of unsigned activation bytes and int8 weights
// with vpdpbusd (four multiply-adds per int32 lane, exact).
// Compiled with -mavx512vnni (and AVX-512F's and BW's flags) only; called only when the CPU reports it.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/bf16.hpp"
#include "kernels/ukernel.hpp"

namespace pwcpu::kernels {
namespace avx512vnni {

constexpr char kUnitIsa[] = "avx512vnni";
#include "kernels/avx512_vec.inl"

struct IVec {
    static constexpr int kGroup = 4;  // quads of unsigned bytes times int8 weights, summed exactly in int32
    using A = uint8_t;
    using B = int8_t;
    using P = __m512i;
    using I = __m512i;
    static I zero() { return _mm512_setzero_si512(); }
    static P load_groups(const int8_t* p) { return _mm512_loadu_si512(p); }
    static P broadcast_group(const uint8_t* p) {
        int32_t quad;
        std::memcpy(&quad, p, sizeof quad);
        return _mm512_set1_epi32(quad);
    }
    // acc plus, per lane, the four products of a's unsigned bytes and b's signed ones. Written as
    // the instruction: through the intrinsic GCC 12 keeps a copy of every accumulator on the stack
    // and moves it back into a register each step (measured: 1.6-1.8x fp32's speed instead of 2.5-3x).
    static I madd_add(I acc, P a, P b) {
        __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
        return acc;
    }
    static __m512 to_float(I x) { return _mm512_cvtepi32_ps(x); }
    static I set1(int32_t x) { return _mm512_set1_epi32(x); }
    static I add(I a, I b) { return _mm512_add_epi32(a, b); }
    static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
    static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
    static I load_i32(const int32_t* p) { return _mm512_loadu_si512(p); }
    static I round(__m512 x) { return _mm512_cvtps_epi32(x); }
    static void store_bytes(uint8_t* p, I x, size_t n, bool is_signed) {
        const __m128i bytes = is_signed ? _mm512_cvtsepi32_epi8(x) : _mm512_cvtusepi32_epi8(x);
        _mm_mask_storeu_epi8(p, Vec::mask(n), bytes);
    }
};

#include "kernels/f32_epilogue.inl"
#include "kernels/f32_gemm_tile.inl"
#include "kernels/grouped_dot.inl"
#include "kernels/int8_gemm_tile.inl"

}  // namespace avx512vnni

const IsaKernels& avx512vnni_kernels() {
    static const IsaKernels table = [] {
        IsaKernels t = avx512_kernels();
        t.isa = "avx512vnni";
        t.gemm_int8 = {avx512vnni::int8_gemm_kernel<14, 2>(1.0f), avx512vnni::int8_gemm_kernel<14, 1>(0.8f)};
        t.quantize_rows_int8 = avx512vnni::quantize_rows_int8;
        t.widen_row_int8 = avx512vnni::widen_row_int8;
        t.int8_isa = "avx512vnni";
        t.int8_wide_weights = &avx2_kernels();
        return t;
    }();
    return table;
}

}  // namespace pwcpu::kernels
