// AMX (Intel Sapphire Rapids and later Xeons): the AVX-512 BF16 and VNNI units' kernels, except
// the bf16 and int8 GEMMs, whose tiles the AMX unit multiplies: one tdpbf16ps multiplies a 16 x 32
// tile of bfloat16 activations by a 32 x 16 tile of weights into 16 x 16 float32 sums (8192
// multiply-adds, 16 times a 512-bit vdpbf16ps's), one tdpbusd a 16 x 64 tile of unsigned bytes
// by a 64 x 16 tile of int8 weights into int32 sums, exactly (as vpdpbusd, 16 times as many).
// Compiled with -mamx-tile -mamx-bf16 -mamx-int8 (and AVX-512's flags) only; called only when the
// CPU reports AMX and the OS has granted this process the tile data state (see dispatch.cpp).
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/ukernel.hpp"

namespace pwcpu::kernels {
namespace avx512amx {

constexpr char kUnitIsa[] = "avx512amx";
#include "kernels/avx512_vec.inl"
#include "kernels/avx512vnni_ivec.inl"
#include "kernels/f32_epilogue.inl"
#include "kernels/f32_gemm_tile.inl"
#include "kernels/grouped_dot.inl"
#include "kernels/int8_gemm_tile.inl"

// Every tile register is 16 rows of 64 bytes: 16 rows of 64 bytes of activations (32 bfloat16
// values, or 64 bytes), 16 rows of 16 groups of weights (pairs or quads: 32 or 64 channels deep),
// or 16 x 16 sums. Registers 0-3 hold the sums (rows block i, columns block j in 2i + j), 4-5 the
// activations, 6-7 the weights.
constexpr int kTileRows = 16;
constexpr int kTileRowBytes = 64;
constexpr int kTileColumns = 16;

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

// What a tile multiply takes and gives: bfloat16 pairs into float32 sums, or unsigned bytes times
// int8 weights (quads) into exact int32 sums. multiply_add<I>() adds to sums block I its rows
// block's activations times its columns block's weights. (The intrinsics take register numbers as
// literal tokens, pasted into the assembly: hence one line per block.)
struct Bf16Tiles {
    using Sum = float;
    static constexpr int kGroup = 2;
    template <int I>
    static void multiply_add() {
        if constexpr (I == 0) _tile_dpbf16ps(0, 4, 6);
        if constexpr (I == 1) _tile_dpbf16ps(1, 4, 7);
        if constexpr (I == 2) _tile_dpbf16ps(2, 5, 6);
        if constexpr (I == 3) _tile_dpbf16ps(3, 5, 7);
    }
};

struct Int8Tiles {
    using Sum = int32_t;
    static constexpr int kGroup = 4;
    template <int I>
    static void multiply_add() {
        if constexpr (I == 0) _tile_dpbusd(0, 4, 6);
        if constexpr (I == 1) _tile_dpbusd(1, 4, 7);
        if constexpr (I == 2) _tile_dpbusd(2, 5, 6);
        if constexpr (I == 3) _tile_dpbusd(3, 5, 7);
    }
};

// The MT x NT blocks of 16 x 16 sums of a tile of MT * 16 rows by NT * 16 columns, over the whole
// (tile-padded) reduction. Weights: the panel's groups, a row of NT * 16 groups per group of channels.
template <class Tiles, int MT, int NT>
PWCPU_INLINE void tile_sums(const GemmTileArgs& p, typename Tiles::Sum (&sums)[MT * kTileRows][NT * kTileColumns]) {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
    const char* a = static_cast<const char*>(p.a_converted[0]);
    const long a_stride = static_cast<long>(p.a_converted_stride);
    const char* w = static_cast<const char*>(p.w);
    constexpr long kWeightStride = NT * kTileRowBytes;
    constexpr size_t kDepth = kTileRowBytes / (4 / Tiles::kGroup);  // channels per multiply: 32 or 64
    for (size_t kk = 0; kk < p.kc; kk += kDepth) {
        _tile_loadd(6, w, kWeightStride);
        if constexpr (NT == 2) _tile_loadd(7, w + kTileRowBytes, kWeightStride);
        _tile_loadd(4, a, a_stride);
        Tiles::template multiply_add<0>();
        if constexpr (NT == 2) Tiles::template multiply_add<1>();
        if constexpr (MT == 2) {
            _tile_loadd(5, a + kTileRows * a_stride, a_stride);
            Tiles::template multiply_add<2>();
            if constexpr (NT == 2) Tiles::template multiply_add<3>();
        }
        a += kTileRowBytes;
        w += kTileRows * kWeightStride;
    }
    constexpr long kSumStride = NT * kTileColumns * sizeof(typename Tiles::Sum);
    _tile_stored(0, &sums[0][0], kSumStride);
    if constexpr (NT == 2) _tile_stored(1, &sums[0][kTileColumns], kSumStride);
    if constexpr (MT == 2) _tile_stored(2, &sums[kTileRows][0], kSumStride);
    if constexpr (MT == 2 && NT == 2) _tile_stored(3, &sums[kTileRows][kTileColumns], kSumStride);
}

// N rows of the sums, from row `first` on, through the shared tile ends (bias, residual,
// activation, stores; int8's zero points and scales): at most as many rows as registers hold.
template <class Tiles, int NV, int N>
PWCPU_INLINE void finish_rows(const typename Tiles::Sum (*sums)[NV * kTileColumns], int first, const GemmTileArgs& p) {
    GemmTileArgs rows = p;
    rows.c = p.c != nullptr ? p.c + first : nullptr;
    rows.c_bfloat16 = p.c_bfloat16 != nullptr ? p.c_bfloat16 + first : nullptr;
    rows.residual = p.residual != nullptr ? p.residual + first : nullptr;
    if constexpr (std::is_same_v<Tiles, Bf16Tiles>) {
        R acc[N][NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
            const R b = Vec::load(p.bias + v * Vec::W);
#pragma GCC unroll 8
            for (int m = 0; m < N; ++m) acc[m][v] = Vec::add(Vec::load(&sums[first + m][v * Vec::W]), b);
        }
        store_tile<N, NV>(acc, rows);
    } else {
        rows.c_quantized = p.c_quantized != nullptr ? p.c_quantized + first : nullptr;
        rows.row_scale = p.row_scale != nullptr ? p.row_scale + first : nullptr;
        rows.row_zero_point = p.row_zero_point + first;
        IVec::I acc[N][NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
#pragma GCC unroll 8
            for (int m = 0; m < N; ++m) acc[m][v] = IVec::load_i32(&sums[first + m][v * Vec::W]);
        finish_int8_tile<N, NV>(acc, rows);
    }
}

constexpr int kRowsAtOnce = 8;

template <class Tiles, int NV, int N>
void finish_rows_apart(const typename Tiles::Sum (*sums)[NV * kTileColumns], int first, const GemmTileArgs& p) {
    finish_rows<Tiles, NV, N>(sums, first, p);
}

template <class Tiles, int NV, int... N>
constexpr std::array<void (*)(const typename Tiles::Sum (*)[NV * kTileColumns], int, const GemmTileArgs&), sizeof...(N)>
finish_rows_by_count(std::integer_sequence<int, N...>) {
    return {{&finish_rows_apart<Tiles, NV, N + 1>...}};
}

// A tile of ROWS rows (1..32), MT blocks of 16 rows multiplied whole (see
// GemmKernel::loads_row_blocks) and the rows past ROWS dropped; the rows kept are finished
// kRowsAtOnce at a time. Whole tiles (16 or 32 rows, nearly all of them) have their own code;
// tiles of other row counts (a thread's last) share one, which takes its row count at run time:
// a copy of the tile ends for every row count made this unit the slowest to compile.
template <class Tiles, int MT, int NT, int ROWS>
void amx_gemm_tile(const GemmTileArgs& p, int rows) {
    alignas(64) typename Tiles::Sum sums[MT * kTileRows][NT * kTileColumns];
    tile_sums<Tiles, MT, NT>(p, sums);
    if constexpr (ROWS == MT * kTileRows) {
#pragma GCC unroll 4
        for (int first = 0; first < ROWS; first += kRowsAtOnce) finish_rows<Tiles, NT, kRowsAtOnce>(sums, first, p);
    } else {
        static constexpr auto finish = finish_rows_by_count<Tiles, NT>(std::make_integer_sequence<int, kRowsAtOnce>{});
        int first = 0;
        for (; first + kRowsAtOnce <= rows; first += kRowsAtOnce) finish[kRowsAtOnce - 1](sums, first, p);
        if (first < rows) finish[rows - first - 1](sums, first, p);
    }
}

template <class Tiles, int ROWS, int NT>
void amx_gemm_tile_of_rows(const GemmTileArgs& p) {
    constexpr int kBlocks = ROWS > kTileRows ? 2 : 1;
    constexpr bool kWhole = ROWS == kBlocks * kTileRows;
    amx_gemm_tile<Tiles, kBlocks, NT, kWhole ? ROWS : 0>(p, ROWS);
}

template <class Tiles, int NT, int... R>
constexpr std::array<GemmTileFn, sizeof...(R)> amx_tiles_by_rows(std::integer_sequence<int, R...>) {
    return {{&amx_gemm_tile_of_rows<Tiles, R + 1, NT>...}};
}

// Tiles of 32 rows by NT * 16 columns: two blocks of rows share each weight tile loaded.
template <class Tiles, int NT>
GemmKernel amx_gemm_kernel(float throughput) {
    constexpr int kMr = 2 * kTileRows, kNr = NT * kTileColumns;
    static constexpr std::array<GemmTileFn, kMr> tiles =
        amx_tiles_by_rows<Tiles, NT>(std::make_integer_sequence<int, kMr>{});
    static constexpr KernelName name = gemm_kernel_name<kMr, kNr>(
        std::is_same_v<Tiles, Bf16Tiles> ? "bf16_f32_amx_gemm_bias_act_" : "int8_f32_amx_gemm_bias_act_");
    GemmKernel kernel{tiles.data(), kMr, kNr, name.data(), throughput, Tiles::kGroup};
    kernel.reduction_multiple = kTileRowBytes / (4 / Tiles::kGroup);
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
        using avx512amx::Bf16Tiles;
        using avx512amx::Int8Tiles;
        t.gemm_bf16 = {avx512amx::amx_gemm_kernel<Bf16Tiles, 2>(1.0f), avx512amx::amx_gemm_kernel<Bf16Tiles, 1>(0.8f)};
        // int8 rows are quantized as the VNNI unit quantizes them (quads of unsigned bytes).
        const IsaKernels& vnni = avx512vnni_kernels();
        t.gemm_int8 = {avx512amx::amx_gemm_kernel<Int8Tiles, 2>(1.0f), avx512amx::amx_gemm_kernel<Int8Tiles, 1>(0.8f)};
        t.quantize_rows_int8 = vnni.quantize_rows_int8;
        t.widen_row_int8 = vnni.widen_row_int8;
        t.int8_isa = "avx512amx";
        t.int8_wide_weights = vnni.int8_wide_weights;
        t.int8_shallow = &vnni;
        return t;
    }();
    return table;
}

}  // namespace pwcpu::kernels
