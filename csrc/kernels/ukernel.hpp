// The microkernel contract, written once for every ISA.
//
// A microkernel computes one MR x NR tile of the output of a GEMM whose left operand is read in
// place from NHWC pixel rows and whose right operand is a packed weight panel:
//
//   for m < MR, n < nr:
//     acc = (bias ? bias[n] : row_bias ? row_bias[m] : partial[m * partial_stride + n])
//         + sum_{k < kc} a[m][k] * w[k * NR + n]
//     if final: c[m][col + n] = act(acc + (residual ? residual[m][col + n] : 0))
//     else:     partial[m * partial_stride + n] = acc
//
// - a[m] points at row m's first channel of this K block. Every kernel is instantiated for each
//   row count 1..MR, so the M tail is a kernel of its own and no row is computed in vain.
// - w is the panel's kc x NR block of floats, zero-padded to NR columns.
// - bias (the panel's NR biases, one per column) or row_bias (one per row, for NCHW, where rows
//   are output channels) starts a tile; without either the tile continues a previous K block
//   from its partial sums. A reduction split into K blocks keeps its partial sums in a float32
//   scratch tile of the driver's (partial: NR floats per row, whole vectors, padding columns
//   included), never in the output: c is written once, by the final block, so an output of any
//   type could be stored there, and out may alias residual (each tile reads its residual before
//   storing).
// - c[m] and residual[m] point at output row m; the tile's columns start at c[m] + col. Only
//   n < nr are read or written (masked).
// - stream (final tiles only): store whole, aligned vectors with non-temporal stores, bypassing the
//   caches (the output is too large to stay cached); the caller fences before the output is read.
// - Kernels whose activations the driver converts (GemmKernel::converted_group G > 1) read
//   a_converted instead of a: row m's converted values, channels padded with zeros to a multiple
//   of G; kc is that multiple, w holds kc / G rows of NR groups of G weights (w[Gk + i][n] at
//   (k * NR + n) * G + i), and every tile starts with the bias (no split reductions). bf16 ones
//   (G = 2): the activations rounded to bfloat16 (their bits, int16), and bfloat16 weights.
//   int8 ones (dynamic quantization): G = 2, row m's quantized values less the row's zero point
//   (t, in [-255, 255], int16) and int16 weights; or G = 4 (VNNI), the values as unsigned bytes
//   u = t + row_zero_point[m] (the zero point in [0, 255]) and int8 weights, col_sums[n] the sum
//   of column n's weights (sum u * w less row_zero_point[m] * col_sums[n] is the sum of t * w).
//   Either way multiplied and summed exactly in int32. The tile's value before residual and
//   activation is float(sum) * (row_scale[m] * col_scale[n]) + bias[n].
//   Static int8 (c_quantized set): the tile is requantized instead, no residual or activation:
//   q = clamp(round_to_nearest_even(float(sum + bias_int32[n]) * col_scale[n]), out_min, out_max)
//   + out_zero_point, stored as 8-bit values (int8 when out_signed) at c_quantized[m] + col.
// - c_bfloat16 (bf16 kernels of ISAs with AVX512-BF16 only): final tiles are stored rounded to
//   bfloat16 (to nearest even, their bits) at c_bfloat16[m] + col instead of c; no residual.
// - No threads, no allocation, no Python. The kernel's name carries dtype, op, epilogue,
//   MRxNR and ISA, e.g. f32_gemm_bias_act_14x32_avx512.
#pragma once
#include <algorithm>
#include <array>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "pwcpu/pwcpu.hpp"

namespace pwcpu::kernels {

struct GemmTileArgs {
    size_t nr;  // valid columns, 1..NR
    size_t kc;  // reduction length of this K block
    const float* const* a;
    const void* w;  // floats, or for kernels that read converted activations, their weight type
    const float* bias;               // per column; null: row_bias, or continue from partial
    const float* row_bias;           // per row; null: continue from partial (when bias is null too)
    const float* const* residual;    // null: none (read by final tiles)
    float* const* c;
    size_t col;                      // the panel's first output channel within c[m], residual[m]
    float* partial;                  // split reductions: the tile's partial sums, row m at partial + m * partial_stride
    size_t partial_stride;
    Activation act;                  // applied when final
    bool final;                      // the last K block: the tile goes to c, else to partial
    bool stream;                     // final stores may bypass the caches
    // kernels that read converted activations only
    const void* const* a_converted;
    size_t a_converted_stride;       // bytes from one row's converted values to the next's (see GemmKernel::loads_row_blocks)
    // int8 kernels only
    const float* row_scale;          // per row: the scale its values were quantized with
    const float* col_scale;          // per column: its weights' scale (static: the requantization scale)
    const int32_t* row_zero_point;   // quads: per row, the zero point u carries
    const int32_t* col_sums;         // quads: per column, its weights' sum
    // static int8 only
    const int32_t* bias_int32;
    uint8_t* const* c_quantized;
    // bf16 output
    uint16_t* const* c_bfloat16;
    float out_min, out_max;          // the output type's range less its zero point
    int32_t out_zero_point;
    bool out_signed;
};

using GemmTileFn = void (*)(const GemmTileArgs&);

struct GemmKernel {
    const GemmTileFn* by_rows = nullptr;  // by_rows[r - 1] computes tiles of exactly r rows, 1 <= r <= mr
    int mr = 0;
    int nr = 0;
    const char* name = "";
    // Its speed on full panels relative to the ISA's main kernel: a layer takes the kernel with the
    // least work per useful column (panel columns padded up to nr, over this). The figure in the
    // tables was measured on one machine; the dispatch times the fp32 kernels on the CPU at hand.
    float throughput = 1.0f;
    // 1: it reads float32 activations in place. G > 1: it reads them converted by the driver into
    // rows of groups of G values (int8 always, bf16 on CPUs with a bfloat16 dot product), 16-bit
    // values in pairs or bytes in quads, its weights packed alike (see grouped_dot.inl); the driver
    // then never splits the reduction.
    int converted_group = 1;
    // Kernels that multiply tiles of registers (AMX) rather than vectors:
    // - converted rows and weights are zero-padded to a multiple of reduction_multiple channels
    //   (a tile's depth), not only of converted_group;
    // - loads_row_blocks: a tile's rows are read as one block, row m at a_converted[0] + m *
    //   a_converted_stride for every m < mr, whatever the tile's row count (rows past it are
    //   computed and dropped: the driver's buffers hold whole blocks);
    // - begin_thread sets up what the tiles need (the tile configuration) on a thread before its
    //   first tile of a call, end_thread releases it after its last.
    int reduction_multiple = 1;
    bool loads_row_blocks = false;
    void (*begin_thread)() = nullptr;
    void (*end_thread)() = nullptr;
    bool converts() const { return converted_group > 1; }
    int64_t converted_value_bytes() const { return converted_group == 4 ? 1 : 2; }
    // A reduction of `channels` as the kernel reads it: padded to whole groups (and tiles).
    int64_t padded_reduction(int64_t channels) const {
        const int64_t multiple = std::max(converted_group, reduction_multiple);
        return (channels + multiple - 1) / multiple * multiple;
    }
};

// A kernel's per-thread set-up (see GemmKernel::begin_thread) for the lifetime of a thread's work.
class ThreadSetup {
public:
    explicit ThreadSetup(const GemmKernel& kernel) : end_(kernel.end_thread) {
        if (kernel.begin_thread != nullptr) kernel.begin_thread();
    }
    ~ThreadSetup() {
        if (end_ != nullptr) end_();
    }
    ThreadSetup(const ThreadSetup&) = delete;
    ThreadSetup& operator=(const ThreadSetup&) = delete;

private:
    void (*end_)();
};

// The depthwise-convolution microkernel: a run of equally spaced output pixels, every channel.
//
//   for p < pixels, c < channels:
//     acc = bias[c] + sum_{t < taps} (input[t] + p * input_step)[c] * weight[t][c]
//           + (residual ? (residual + p * residual_step)[c] : 0)
//     (out + p * out_step)[c] = act(acc)
//
// - input[t] points at channel 0 of the input pixel under tap t of the run's first pixel (a row
//   of zeros where the tap falls in the padding, in a run of one pixel): stride and padding live
//   in these pointers and the step.
// - w is packed per block of `channel_block` channels (the ISA's vector width): the block's biases,
//   then its taps x channel_block weights; the channels are zero-padded to whole blocks.
// - Steps are in elements. Only c < channels are touched.
// - kernel_w > 0 says the taps are a kernel_w-wide filter's rows, laid out regularly: tap
//   (i, j) = input[i * kernel_w] + j * tap_step, and input_step = stride_w * tap_step. The kernel
//   may then load each input column once for every pixel and tap that reads it.
struct DwRowArgs {
    size_t pixels;
    size_t channels;
    size_t taps;
    const float* const* input;
    ptrdiff_t input_step;
    const float* w;
    float* out;
    ptrdiff_t out_step;
    const float* residual;  // null: none
    ptrdiff_t residual_step;
    Activation act;
    int kernel_w;        // 0: taps in no particular layout
    int stride_w;
    ptrdiff_t tap_step;
};

using DwRowFn = void (*)(const DwRowArgs&);

struct DwKernel {
    DwRowFn row = nullptr;
    int channel_block = 0;
    const char* name = "";
};

// Activations rounded to bfloat16 (kept as floats) for the bf16 precision: dst[i] = round(src[i])
// for i < n; dst may be src.
using RoundRunFn = void (*)(const float* src, float* dst, size_t n);

// Pixels' n channels quantized for the int8 kernels (see GemmTileArgs), row r read from
// src[r] + offset: to int8 with the row's own scale and zero point (its range, 0 included, over 255
// steps), stored in dst + r * dst_stride (in values), [0..n), [n..padded) zeroed, as the ISA's int8
// kernels read them: less the zero point (int16), or for quads plus zero_points[r] (bytes, 0 for
// a zeroed row; zero_points is unused otherwise). scales[r] is the row's scale; NaN when the row
// holds a NaN or an infinity (its outputs are then NaN).
using QuantizeRowsFn = void (*)(const float* const* src, ptrdiff_t offset, size_t rows, size_t n, void* dst,
                                size_t dst_stride, size_t padded, float* scales, int32_t* zero_points);

// bf16 pair kernels: pixels' n channels rounded to bfloat16, row r read from src[r] + offset, the
// values' bits stored in dst + r * dst_stride, [0..n), [n..padded) zeroed.
using RoundRowsFn = void (*)(const float* const* src, ptrdiff_t offset, size_t rows, size_t n, int16_t* dst,
                             size_t dst_stride, size_t padded);

// Static int8: n 8-bit values (int8 when is_signed) as the int8 kernels read them, dst[n..padded)
// zeroed: pairs, dst[i] = src[i] - zero_point (int16); quads, the bytes made unsigned (src[i] + 128
// when is_signed), whose zero point is then zero_point (+ 128 when is_signed).
using WidenRowFn = void (*)(const uint8_t* src, size_t n, bool is_signed, int32_t zero_point, void* dst,
                            size_t padded);

// kFmaChains * W fused multiply-adds per iteration, for measuring the machine's peak.
using FmaProbeFn = float (*)(size_t iterations);

// What one ISA's translation unit offers: GEMM kernels of several panel widths (the first the
// main one, which NCHW layers use), kernels of its own for bf16 where it has a bfloat16 dot
// product, the depthwise kernel, the rounding of activations to bfloat16, and its FMA peak probe.
struct IsaKernels {
    static constexpr int kMaxGemmKernels = 4;
    using GemmKernels = std::array<GemmKernel, kMaxGemmKernels>;  // unused entries have no by_rows
    const char* isa;
    GemmKernels gemm;
    // bf16's kernels, where they are not the float32 ones: elsewhere bf16 multiplies the rounded
    // weights (stored as float32) and activations in the float32 kernels, which costs it nothing
    // beyond the rounding (widening bfloat16 weights in the k loop had cost 13-16 % on Zen 4's deep
    // layers).
    GemmKernels gemm_bf16;
    // The int8 family: its kernels, its row quantization, and the ISA they come from (AVX-512
    // machines without VNNI run the AVX2 ones: the AVX-512 unit is built for AVX512F, without BW's
    // vpmaddwd).
    GemmKernels gemm_int8;
    QuantizeRowsFn quantize_rows_int8;
    WidenRowFn widen_row_int8;
    const char* int8_isa;
    // Where its int8 kernels take weights as bytes: the table whose int8 kernels take int16 weights
    // (static int8 weights less a zero point can lie beyond -128..127). Null where they do already.
    const struct IsaKernels* int8_wide_weights;
    DwKernel depthwise;
    RoundRunFn round_to_bf16;
    RoundRowsFn round_rows_to_bf16_pairs;  // for bf16 kernels that read pairs; null where none do
    FmaProbeFn fma_probe;
    int fma_per_iteration;
    // Where its int8 kernels pad each group's reduction deep (AMX: to 64 channels), the table whose
    // int8 kernels serve the layers that padding would more than triple (see int8_kernels_for). Null
    // elsewhere.
    const struct IsaKernels* int8_shallow = nullptr;

    const GemmKernel& main() const { return gemm[0]; }
    const GemmKernels& gemm_of(Precision precision) const {
        if (precision == Precision::bf16 && gemm_bf16[0].by_rows != nullptr) return gemm_bf16;
        return precision == Precision::int8 ? gemm_int8 : gemm;
    }
    // The kernel of a precision that computes `columns` output channels (a layer's, or a group's)
    // fastest; ties go to the earlier one.
    const GemmKernel& gemm_for(int64_t columns, Precision precision = Precision::fp32) const {
        const GemmKernels& kernels = gemm_of(precision);
        const GemmKernel* best = &kernels[0];
        double best_cost = -1.0;
        for (const GemmKernel& k : kernels) {
            if (k.by_rows == nullptr) continue;
            const double cost = static_cast<double>((columns + k.nr - 1) / k.nr * k.nr) / k.throughput;
            if (best_cost < 0.0 || cost < best_cost) {
                best = &k;
                best_cost = cost;
            }
        }
        return *best;
    }
};

const IsaKernels& scalar_kernels();
#if defined(PWCPU_HAVE_X86_KERNELS)
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
const IsaKernels& avx512vnni_kernels();
const IsaKernels& avx512bf16_kernels();
#endif
#if defined(PWCPU_HAVE_AMX_KERNELS)
const IsaKernels& avx512amx_kernels();
#endif

}  // namespace pwcpu::kernels
