// AMX (Intel Sapphire Rapids and later Xeons): the AVX-512 BF16 unit's kernels, except bf16's
// GEMM, whose tiles are multiplied by the AMX unit: one tdpbf16ps multiplies a 16 x 32 tile of
// bfloat16 activations by a 32 x 16 tile of weights into 16 x 16 float32 sums (8192 multiply-adds,
// 16 times a 512-bit vdpbf16ps's).
// Compiled with -mamx-tile -mamx-bf16 (and AVX-512's flags) only; called only when the CPU reports
// AMX and the OS has granted this process the tile data state (see dispatch.cpp).
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <utility>

#include "kernels/ukernel.hpp"

namespace pwcpu::kernels {
namespace avx512amx {

constexpr char kUnitIsa[] = "avx512amx";
#include "kernels/avx512_vec.inl"
#include "kernels/f32_epilogue.inl"
#include "kernels/f32_gemm_tile.inl"

// Every tile register is 16 rows of 64 bytes: 16 rows of 32 bfloat16 activations, 16 rows of 16
// pairs of weights (32 channels deep), or 16 x 16 float32 sums. Registers 0-3 hold the sums
// (rows block i, columns block j in 2i + j), 4-5 the activations, 6-7 the weights.
constexpr int kTileRows = 16;
constexpr int kTileRowBytes = 64;
constexpr int kTileDepth = 32;  // bfloat16 channels per tile multiply

struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
};

// Loading a configuration costs about 100 cycles: it is loaded once per thread per call (the
// driver's begin_thread), and released after, so that another library's tiles on the same thread
// find the state it left them.
void configure_tiles() {
    static const TileConfig config = [] {
        TileConfig c;
        for (int t = 0; t < 8; ++t) {
            c.bytes_per_row[t] = kTileRowBytes;
            c.rows[t] = kTileRows;
        }
        return c;
    }();
    _tile_loadconfig(&config);
}

void release_tiles() { _tile_release(); }

// The MT x NT blocks of 16 x 16 sums of a tile of MT * 16 rows by NT * 16 columns, over the whole
// (tile-padded) reduction. Weights: the panel's pairs, a row of NT * 16 pairs per two channels.
template <int MT, int NT>
PWCPU_INLINE void amx_bf16_sums(const GemmTileArgs& p, float (&sums)[MT * kTileRows][NT * 16]) {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
    const char* a = static_cast<const char*>(p.a_converted[0]);
    const long a_stride = static_cast<long>(p.a_converted_stride);
    const char* w = static_cast<const char*>(p.w);
    constexpr long kWeightStride = NT * kTileRowBytes;
    for (size_t kk = 0; kk < p.kc; kk += kTileDepth) {
        _tile_loadd(6, w, kWeightStride);
        if constexpr (NT == 2) _tile_loadd(7, w + kTileRowBytes, kWeightStride);
        _tile_loadd(4, a, a_stride);
        _tile_dpbf16ps(0, 4, 6);
        if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
        if constexpr (MT == 2) {
            _tile_loadd(5, a + kTileRows * a_stride, a_stride);
            _tile_dpbf16ps(2, 5, 6);
            if constexpr (NT == 2) _tile_dpbf16ps(3, 5, 7);
        }
        a += kTileDepth * sizeof(int16_t);
        w += kTileRows * kWeightStride;
    }
    constexpr long kSumStride = NT * 16 * sizeof(float);
    _tile_stored(0, &sums[0][0], kSumStride);
    if constexpr (NT == 2) _tile_stored(1, &sums[0][16], kSumStride);
    if constexpr (MT == 2) _tile_stored(2, &sums[kTileRows][0], kSumStride);
    if constexpr (MT == 2 && NT == 2) _tile_stored(3, &sums[kTileRows][16], kSumStride);
}

// Rows FIRST..ROWS-1 of the sums, plus the bias, through the shared epilogue (residual,
// activation, stores) a few rows at a time, as many as registers hold.
template <int FIRST, int ROWS, int NV, size_t kSumRows>
PWCPU_INLINE void store_sum_rows(const float (&sums)[kSumRows][NV * 16], const GemmTileArgs& p) {
    constexpr int kRowsAtOnce = 8;
    constexpr int n = ROWS - FIRST < kRowsAtOnce ? ROWS - FIRST : kRowsAtOnce;
    R acc[n][NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
        const R b = Vec::load(p.bias + v * Vec::W);
#pragma GCC unroll 8
        for (int m = 0; m < n; ++m) acc[m][v] = Vec::add(Vec::load(&sums[FIRST + m][v * Vec::W]), b);
    }
    GemmTileArgs rows = p;
    rows.c = p.c + FIRST;
    rows.residual = p.residual != nullptr ? p.residual + FIRST : nullptr;
    store_tile<n, NV>(acc, rows);
    if constexpr (FIRST + n < ROWS) store_sum_rows<FIRST + n, ROWS, NV>(sums, p);
}

// A tile of ROWS (1..32) rows: blocks of 16 rows are multiplied whole (see
// GemmKernel::loads_row_blocks), and the rows past ROWS dropped.
template <int ROWS, int NT>
void amx_bf16_gemm_tile(const GemmTileArgs& p) {
    constexpr int MT = ROWS > kTileRows ? 2 : 1;
    alignas(64) float sums[MT * kTileRows][NT * 16];
    amx_bf16_sums<MT, NT>(p, sums);
    store_sum_rows<0, ROWS, NT>(sums, p);
}

template <int NT, int... R>
constexpr std::array<GemmTileFn, sizeof...(R)> amx_bf16_tiles_by_rows(std::integer_sequence<int, R...>) {
    return {{&amx_bf16_gemm_tile<R + 1, NT>...}};
}

// Tiles of 32 rows by NT * 16 columns: two blocks of rows share each weight tile loaded.
template <int NT>
GemmKernel amx_bf16_gemm_kernel(float throughput) {
    constexpr int kMr = 2 * kTileRows, kNr = NT * 16;
    static constexpr std::array<GemmTileFn, kMr> tiles =
        amx_bf16_tiles_by_rows<NT>(std::make_integer_sequence<int, kMr>{});
    static constexpr KernelName name = gemm_kernel_name<kMr, kNr>("bf16_f32_amx_gemm_bias_act_");
    GemmKernel kernel{tiles.data(), kMr, kNr, name.data(), throughput, 2};
    kernel.reduction_multiple = kTileDepth;
    kernel.loads_row_blocks = true;
    kernel.begin_thread = configure_tiles;
    kernel.end_thread = release_tiles;
    return kernel;
}

}  // namespace avx512amx

const IsaKernels& avx512amx_kernels() {
    static const IsaKernels table = [] {
        IsaKernels t = avx512bf16_kernels();
        t.isa = "avx512amx";
        t.gemm_bf16 = {avx512amx::amx_bf16_gemm_kernel<2>(1.0f), avx512amx::amx_bf16_gemm_kernel<1>(0.8f)};
        return t;
    }();
    return table;
}

}  // namespace pwcpu::kernels
