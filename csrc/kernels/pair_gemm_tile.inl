// The k loop of the kernels whose operands come in pairs of 16-bit values: int8 (int16 pairs,
// vpmaddwd) and bf16 on CPUs with a bfloat16 dot product (vdpbf16ps). Both read their activations
// from the driver's converted rows (GemmTileArgs::a_pairs, kc even) and their weights as kc / 2
// rows of NR pairs.
//
// Included inside the ISA's namespace. Dot provides: P (a register of W pairs), I (W sums),
// load_pairs(p) (2W 16-bit values), broadcast_pair(p) (p[0], p[1] in every pair) and
// madd_add(acc, a, b) (acc plus, in each lane, the two products of its pair).

template <int MR, int NV, class Dot>
PWCPU_INLINE void pair_dot_loop(const GemmTileArgs& p, typename Dot::I (&sums)[MR][NV]) {
    constexpr int W = Vec::W;
    const int16_t* a[MR];
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m) a[m] = p.a_pairs[m];
    const int16_t* w = static_cast<const int16_t*>(p.w);
    for (size_t kk = 0; kk < p.kc; kk += 2) {
        typename Dot::P b[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) b[v] = Dot::load_pairs(w + v * 2 * W);
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) {
            const typename Dot::P am = Dot::broadcast_pair(a[m] + kk);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) sums[m][v] = Dot::madd_add(sums[m][v], am, b[v]);
        }
        w += NV * 2 * W;
    }
}
