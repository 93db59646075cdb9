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

constexpr char kUnitIsa[] = "avx512";
#include "kernels/avx512_vec.inl"

#include "kernels/f32_epilogue.inl"
#include "kernels/f32_gemm_tile.inl"
#include "kernels/fma_probe.inl"
#include "kernels/f32_dwconv.inl"
#include "kernels/bf16_round.inl"

}  // namespace avx512

// 14x16 comes in its plain and its shuffled form (see TileForm): the dispatch keeps the one it
// times faster on the CPU at hand. On an Intel Xeon the plain one ran 14x16 layers 14-22 % faster.
const IsaKernels& avx512_kernels() {
    static const IsaKernels table{
        "avx512",
        {avx512::gemm_kernel<14, 2>(1.0f), avx512::gemm_kernel<14, 1>(0.8f),
         avx512::gemm_kernel<14, 2, avx512::TileForm::half_last>(0.9f),
         avx512::gemm_kernel<14, 1, avx512::TileForm::shuffled>(0.75f)},
        {},
        avx2_kernels().gemm_int8,
        avx2_kernels().quantize_rows_int8,
        avx2_kernels().widen_row_int8,
        avx2_kernels().int8_isa,
        nullptr,
        {avx512::f32_dwconv_row, avx512::Vec::W, "f32_dwconv_bias_act_avx512"},
        avx512::round_to_bf16_run,
        nullptr,
        avx512::fma_peak_probe,
        avx512::kFmaChains * avx512::Vec::W,
    };
    return table;
}

}  // namespace pwcpu::kernels
