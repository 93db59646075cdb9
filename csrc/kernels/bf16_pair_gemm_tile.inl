// The bf16 GEMM tile of CPUs with a bfloat16 dot product: pairs of channels multiplied and summed
// in float32 by one instruction (vdpbf16ps: two multiply-adds per lane, twice the fp32 FMA rate).
//
// Included inside the ISA's namespace after f32_gemm_tile.inl (store_tile, the kernel's name) and
// grouped_dot.inl (the k loop). Bf16Dot is a Dot (see grouped_dot.inl) of bfloat16 pairs summed
// into float32 lanes (I is R).

template <int MR, int NV>
void bf16_pair_gemm_tile(const GemmTileArgs& p) {
    constexpr int W = Vec::W;
    R acc[MR][NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
        const R b = Vec::load(p.bias + v * W);
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) acc[m][v] = b;
    }
    grouped_dot_loop<MR, NV, Bf16Dot>(p, acc);
    store_tile<MR, NV>(acc, p);
}

template <int NV, int... R>
constexpr std::array<GemmTileFn, sizeof...(R)> bf16_pair_tiles_by_rows(std::integer_sequence<int, R...>) {
    return {{&bf16_pair_gemm_tile<R + 1, NV>...}};
}

template <int MR, int NV>
GemmKernel bf16_pair_gemm_kernel(float throughput) {
    static constexpr std::array<GemmTileFn, MR> tiles =
        bf16_pair_tiles_by_rows<NV>(std::make_integer_sequence<int, MR>{});
    static constexpr KernelName name = gemm_kernel_name<MR, NV * Vec::W>("bf16_f32_dot_gemm_bias_act_");
    return {tiles.data(), MR, NV * Vec::W, name.data(), throughput, Bf16Dot::kGroup};
}
