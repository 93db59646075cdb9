// The k loop of the kernels whose activations the driver converts into rows of small values taken
// in groups (GemmTileArgs::a_converted; GemmKernel::converted_group): pairs of 16-bit values for
// int8 (vpmaddwd) and for bf16 on CPUs with a bfloat16 dot product (vdpbf16ps), quads of bytes for
// int8 on CPUs with VNNI (vpdpbusd). The weights come as kc / G rows of NR groups.
//
// Included inside the ISA's namespace. Dot provides: kGroup (G), A and B (the activations' and
// the weights' element types), P (a register of W groups), I (W sums), load_groups(p) (G * W
// weights), broadcast_group(p) (p[0..G) in every group) and madd_add(acc, a, b) (acc plus, in each
// lane, the G products of its group).

template <int MR, int NV, class Dot>
PWCPU_INLINE void grouped_dot_loop(const GemmTileArgs& p, typename Dot::I (&sums)[MR][NV]) {
    constexpr int W = Vec::W, G = Dot::kGroup;
    const typename Dot::A* a[MR];
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m) a[m] = static_cast<const typename Dot::A*>(p.a_converted[m]);
    const typename Dot::B* w = static_cast<const typename Dot::B*>(p.w);
    for (size_t kk = 0; kk < p.kc; kk += G) {
        typename Dot::P b[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) b[v] = Dot::load_groups(w + v * G * W);
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) {
            const typename Dot::P am = Dot::broadcast_group(a[m] + kk);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) sums[m][v] = Dot::madd_add(sums[m][v], am, b[v]);
        }
        w += NV * G * W;
    }
}
