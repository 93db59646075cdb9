// The FMA peak probe of an ISA's base unit (its table's fma_probe), included inside the ISA's
// namespace after f32_gemm_tile.inl; the extension units, which reuse the base unit's table, do
// not include it.

// The machine's FMA peak, for benchmarks: kFmaChains independent multiply-add chains, enough to
// cover the FMA latency on every pipe while fitting in 16 registers. Returns a value that depends
// on every chain.
constexpr int kFmaChains = 12;

float fma_peak_probe(size_t iterations) {
    R acc[kFmaChains];
    for (int j = 0; j < kFmaChains; ++j) acc[j] = Vec::set1(1e-3f * static_cast<float>(j));
    const R scale = Vec::set1(0.999f), shift = Vec::set1(1e-4f);
    for (size_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
        for (int j = 0; j < kFmaChains; ++j) acc[j] = Vec::fma(acc[j], scale, shift);
    }
    float lanes[Vec::W];
    float total = 0.0f;
    for (int j = 0; j < kFmaChains; ++j) {
        Vec::store_n(lanes, acc[j], Vec::W);
        for (float lane : lanes) total += lane;
    }
    return total;
}

