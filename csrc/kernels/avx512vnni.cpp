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

#include "kernels/avx512vnni_ivec.inl"

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
