// The GEMM driver: weight packing, cache blocking and the fused epilogue's bookkeeping for the
// 1x1 convolution. It knows kernels only through the contract in kernels/ukernel.hpp and the
// dispatch table; threads, buffers and row walking come from runtime/, shared by every operator.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.hpp"
#include "kernels/bf16.hpp"
#include "pwcpu/pwcpu.hpp"
#include "runtime/memory.hpp"
#include "runtime/rows.hpp"
#include "runtime/threads.hpp"
#include "runtime/timed_choice.hpp"

namespace pwcpu {

using kernels::GemmKernel;
using kernels::GemmTileArgs;
using kernels::GemmTileFn;
using runtime::AlignedBuffer;
using runtime::allocate_floats;
using runtime::ceil_div;
using runtime::checked_floats;
using runtime::checked_mul;
using runtime::RowWalker;
using runtime::WorkRange;

namespace {

std::atomic<int64_t> forced_reduction_block{0};

constexpr int kMaxMR = 32;
// Rows of a band (see Impl::run).
constexpr int64_t kMaxBandRows = 256;
// bf16: the most activations (floats) a thread rounds up front (see Impl::run); beyond, they are
// rounded a band at a time for each block of panels.
constexpr int64_t kMaxRoundedRangeFloats = int64_t{1} << 24;

// ---- blocking -------------------------------------------------------------------------------

struct Blocking {
    int64_t kc;          // reduction length per K block
    int64_t k_blocks;
    int64_t nc_panels;   // panels whose kc x NR weights are kept in L2 together
    int64_t mc_tiles;    // tiles per M block when the reduction is split
};

// kc_limit (> 0): K blocks of at most this many channels, whatever the reduction.
Blocking choose_blocking(const GemmKernel& kernel, int64_t cg, int64_t panels, int64_t tiles,
                         int64_t weight_bytes = sizeof(float), bool splittable = true, int64_t kc_limit = 0) {
    const detail::CacheSizes& cache = detail::cache_sizes();
    const int64_t bytes = sizeof(float);
    // The reduction is split only when an MR x kc tile of activations would crowd L2: streaming
    // each row of the tile from L2 costs less than storing and re-reading partial sums, so
    // on a 1 MiB L2 even ResNet's C = 2048 and a 3072-wide feed-forward layer run unsplit.
    const int64_t forced = forced_reduction_block.load(std::memory_order_relaxed);
    int64_t kc_max = forced > 0 ? forced : std::max<int64_t>(256, cache.l2 / 4 / (kernel.mr * bytes) / 16 * 16);
    if (kc_limit > 0) kc_max = std::min(kc_max, kc_limit);
    Blocking b{};
    b.k_blocks = cg <= kc_max || !splittable ? 1 : ceil_div(cg, kc_max);
    b.kc = std::max<int64_t>(1, ceil_div(cg, b.k_blocks));
    // The weights of a block of panels stream from L2, shared by all tiles.
    b.nc_panels = std::clamp<int64_t>(cache.l2 / 2 / (b.kc * kernel.nr * weight_bytes), 1, std::max<int64_t>(panels, 1));
    // With a split reduction, an M block's partial sums (a scratch tile beside the weights' half of
    // L2) must still be in L2 for the next K block.
    b.mc_tiles = b.k_blocks == 1
                     ? std::max<int64_t>(tiles, 1)
                     : std::max<int64_t>(1, cache.l2 / 2 / (b.nc_panels * kernel.nr * kernel.mr * bytes));
    return b;
}

// A thread's rows (or a block's) cut into tiles of at most mr rows and of heights that differ by
// one at most: 49 rows of AVX2's 6x16 kernel as 4 x 6 + 5 x 5 rather than 8 x 6 + 1. A tile of one
// row has two accumulators, so its k loop runs at the FMA's latency, not its throughput: it took
// two thirds of a full tile's time for a sixth of its work. Kernels that load whole blocks of rows
// (AMX) keep full tiles and a last partial one.
class RowTiles {
public:
    RowTiles(int64_t rows, int64_t mr, bool even)
        : rows_(rows), count_(ceil_div(rows, mr)),
          height_(even && count_ > 0 ? rows / count_ : mr), taller_(even && count_ > 0 ? rows % count_ : 0) {}
    int64_t count() const { return count_; }
    // The first row of tile t (of the rows' end for t >= count).
    int64_t start(int64_t t) const { return t >= count_ ? rows_ : t * height_ + std::min(t, taller_); }

private:
    int64_t rows_, count_, height_, taller_;  // `taller_` tiles of height_ + 1 rows first
};

// Rows of an NHWC tile lie one pixel apart in x. When that distance is a multiple of 4 KiB (C of
// 1024, 2048, 3072...), every row falls in the same L1 set (4 KiB is sets x line size on the
// 32 KiB 8-way and 48 KiB 12-way L1s of current x86 cores), and a tile of more rows than the set
// has ways evicts its own rows on every k step. Such layers' rows are copied (a band at a time, or
// a thread's rows up front, as bf16 rounds them) into a buffer whose rows are a cache line longer,
// and the kernels run whole tiles: each row is copied once, a small share of the multiply-adds
// that read it. Against tiles of half the rows (what such layers took before), on an Intel Xeon
// with AMX (AVX-512, 14x32 kernel, alternating runs): 14x14x1024->256 +5 % / +8 % at 1 / 2
// threads, 7x7x2048->512 +7 % / +7 %, 7x7x1024->1024 +11 % / +11 %. (On Zen 4, half tiles had
// taken 14x14x1024->256 from 82 to 108 GFLOP/s, 7x7x2048->512 from 72 to 106, of 118.)
template <class T>
bool aliased_rows(const BasicTensorView<T>& x, const ConvGeometry& geo) {
    const int64_t pixel_bytes = std::abs(x.strides[2] * geo.stride_w) * static_cast<int64_t>(sizeof(T));
    return pixel_bytes != 0 && pixel_bytes % 4096 == 0;
}

// Floats from one row of a driver's buffer of rows of `span` floats to the next: a cache line more
// where the span alone would alias (see aliased_rows).
int64_t unaliased_stride(int64_t span) { return span * int64_t{sizeof(float)} % 4096 == 0 ? span + 16 : span; }

// Asks for the cache lines of bytes [p, p + bytes) to come into L2 (write: for writing). The loop
// runs the same number of times wherever p lies in its line, so its branch is predicted: a run that
// straddles one more line than it fills is finished by the last byte's prefetch.
template <bool write>
void prefetch_to_l2(const void* p, int64_t bytes) {
    const char* const first = static_cast<const char*>(p);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(first + b, write, 2);
    __builtin_prefetch(first + bytes - 1, write, 2);
}

// Sets up the tile arguments for K block kb of a reduction of length cg: its length, and for the
// last block the epilogue (activation, streaming stores). Returns the block's first channel.
int64_t begin_k_block(GemmTileArgs& args, const Blocking& blk, int64_t kb, int64_t cg, Activation act, bool stream) {
    const int64_t k0 = kb * blk.kc;
    args.kc = static_cast<size_t>(std::clamp<int64_t>(cg - k0, 0, blk.kc));
    args.final = kb + 1 == blk.k_blocks;
    args.stream = args.final && stream;
    args.act = args.final ? act : Activation::none;
    return k0;
}

// `count` rows of `span` floats into rows of dst `dst_stride` floats apart: rounded to bfloat16
// (bf16 without a dot product) or copied. Rows that follow each other in memory (a stride-1 layer
// read whole), into rows that do too, are rounded in one run: a call per row would cost as much
// as rounding a short row (C = 16-32) itself.
void copy_rows(const kernels::IsaKernels& isa, const float* const* rows, int64_t count, int64_t span, float* dst,
               int64_t dst_stride, bool round) {
    const auto address = [](const float* p) { return reinterpret_cast<uintptr_t>(p); };
    const uintptr_t row_bytes = static_cast<uintptr_t>(span) * sizeof(float);
    for (int64_t m = 0; m < count;) {
        int64_t run = 1;
        while (dst_stride == span && m + run < count &&
               address(rows[m + run]) == address(rows[m]) + static_cast<uintptr_t>(run) * row_bytes) {
            ++run;
        }
        if (round) {
            isa.round_to_bf16(rows[m], dst + m * dst_stride, static_cast<size_t>(run * span));
        } else {
            std::memcpy(dst + m * dst_stride, rows[m], static_cast<size_t>(run) * row_bytes);
        }
        m += run;
    }
}

// int8: the most input channels per group, so that sums of products of at most 255 x 127 stay exact
// in int32 (see int8_gemm_tile.inl).
constexpr int64_t kMaxInt8Channels = 65536;

// An output channel's int8 weight scale: its largest magnitude over 127 (0 for a channel of zeros
// or of values too small for a normal scale: its weights quantize to 0). Throws for a weight that
// is NaN or infinite, which no scale represents.
float int8_weight_scale(const float* row, int64_t count, int64_t stride) {
    float largest = 0.0f;
    for (int64_t c = 0; c < count; ++c) {
        const float value = row[c * stride];
        if (!std::isfinite(value)) throw std::invalid_argument("precision int8 needs finite weights");
        largest = std::max(largest, std::fabs(value));
    }
    const float scale = largest / 127.0f;
    return scale >= std::numeric_limits<float>::min() ? scale : 0.0f;
}

int16_t quantize_weight(float value, float scale) {
    if (scale == 0.0f) return 0;
    return static_cast<int16_t>(std::clamp(std::nearbyint(value / scale), -127.0f, 127.0f));
}

}  // namespace

void set_max_reduction_block(int64_t channels) {
    if (channels < 0) throw std::invalid_argument("set_max_reduction_block: channels must be >= 0");
    forced_reduction_block.store(channels, std::memory_order_relaxed);
}

// ---- packed weights -------------------------------------------------------------------------

// The int8 kernels of the family's table for a layer of `cg` channels per group: where the
// table's kernels would pad the reduction to more than three times its channels (AMX's 64-deep
// tiles under C = 22), those of the table it names for shallow layers (VNNI's, 4 deep). On an
// Intel Xeon with AMX, dynamic int8, VNNI against AMX at 1 / 2 threads: 112x112x16->96 1.11x /
// 1.09x; where AMX pads less, it stays ahead: 56x56x24->144 0.97x / 0.90x, 28x28x32->192 0.85x.
const kernels::IsaKernels* int8_kernels_for(const kernels::IsaKernels* family, int64_t cg) {
    const kernels::IsaKernels* shallow = family->int8_shallow;
    const int64_t padded = family->gemm_int8[0].padded_reduction(cg);
    return shallow != nullptr && padded > 3 * std::max<int64_t>(cg, 1) ? shallow : family;
}

struct PackedWeights::Impl {
    // The table chosen for the precision when the weights were packed, and the one whose kernels
    // they are packed for: the same, or one the family's table names for this layer.
    const kernels::IsaKernels* family = nullptr;
    const kernels::IsaKernels* isa = nullptr;
    GemmKernel kernel;
    Layout layout = Layout::nhwc;
    Precision precision = Precision::fp32;
    int64_t k = 0, cg = 0, groups = 1;
    int64_t kg = 0;
    // NHWC: the weights are the kernel's packed right operand, NR output channels per panel with
    // their biases in front, then C x NR weights (floats; for bf16, rounded). Kernels that read
    // converted activations in groups of G (int8; bf16 with a dot product): the biases, the NR
    // weight scales (float; 1 for bf16), the NR columns' weight sums (int32; used by quads), then
    // C/G (rounded up) rows of NR groups of weights (quantized int8, as int16 or bytes, or
    // bfloat16 bits; see ukernel.hpp).
    int64_t panels_per_group = 0, panel_stride = 0;
    AlignedBuffer panels;
    // NCHW: the weights are the kernel's left operand, read in place as K rows of C/groups (a
    // contiguous copy), with one bias per row; the activations are packed per call instead.
    AlignedBuffer weight_rows, row_bias;

    int64_t panel_count() const { return groups * panels_per_group; }

    // The layer's shape, checked, and the ISA whose kernels it is packed for.
    void set_shape(int64_t out_channels, int64_t in_channels_per_group, int64_t group_count, Layout order,
                   Precision kind) {
        if (group_count < 1 || out_channels < 0 || in_channels_per_group < 0 || out_channels % group_count != 0) {
            throw std::invalid_argument("PackedWeights: groups must be >= 1 and divide the output channels");
        }
        if (kind == Precision::int8 && order == Layout::nchw) {
            throw std::invalid_argument("precision int8 computes NHWC layers only");
        }
        if (kind == Precision::int8 && in_channels_per_group > kMaxInt8Channels) {
            throw std::invalid_argument("precision int8 sums at most " + std::to_string(kMaxInt8Channels) +
                                        " input channels per group exactly; this layer has " +
                                        std::to_string(in_channels_per_group));
        }
        family = &detail::family_kernels(kind);
        isa = kind == Precision::int8 ? int8_kernels_for(family, in_channels_per_group) : family;
        k = out_channels;
        cg = in_channels_per_group;
        groups = group_count;
        kg = out_channels / group_count;
        layout = order;
        precision = kind;
    }

    // Panels of groups (see above) from value(row, c) (the integer the kernel multiplies: a
    // quantized weight, or bfloat16 bits), bias(row) (the float stored in its slot: the bias, or
    // static int8's int32 bias bits) and scale(row).
    template <class Value, class Bias, class Scale>
    void pack_groups(const Value& value, const Bias& bias, const Scale& scale) {
        const int64_t nr = kernel.nr, group = kernel.converted_group, bytes = kernel.converted_value_bytes();
        const char* what = "weight (K x C/groups), packed";
        const int64_t weight_bytes = checked_mul(checked_mul(nr, kernel.padded_reduction(cg), what), bytes, what);
        panel_stride = 3 * nr + ceil_div(weight_bytes, int64_t{4});
        panels = allocate_floats(checked_floats(checked_mul(panel_count(), panel_stride, what), what), what);
        std::memset(panels.get(), 0, sizeof(float) * static_cast<size_t>(panel_count() * panel_stride));
        for (int64_t p = 0; p < panel_count(); ++p) {
            const int64_t g = p / panels_per_group;
            const int64_t first = g * kg + (p % panels_per_group) * nr;
            const int64_t width = std::min<int64_t>(nr, (g + 1) * kg - first);
            float* dst = panels.get() + p * panel_stride;
            int32_t* const sums = reinterpret_cast<int32_t*>(dst + 2 * nr);
            int8_t* const quads = reinterpret_cast<int8_t*>(dst + 3 * nr);
            int16_t* const pairs = reinterpret_cast<int16_t*>(dst + 3 * nr);
            for (int64_t n = 0; n < width; ++n) {
                dst[n] = bias(first + n);
                dst[nr + n] = scale(first + n);
                int32_t sum = 0;
                for (int64_t c = 0; c < cg; ++c) {
                    const int32_t v = value(first + n, c);
                    const int64_t at = ((c / group) * nr + n) * group + c % group;
                    if (bytes == 1) {
                        quads[at] = static_cast<int8_t>(v);
                    } else {
                        pairs[at] = static_cast<int16_t>(v);
                    }
                    sum += v;
                }
                sums[n] = sum;
            }
        }
    }
    const float* panel(int64_t p) const { return panels.get() + p * panel_stride; }
    // Panel p's weights from channel k0 on, after its NR biases: floats, or converted groups.
    const void* panel_weights(int64_t p, int64_t k0) const {
        const float* after_bias = panel(p) + kernel.nr;
        if (kernel.converts()) return reinterpret_cast<const char*>(after_bias + 2 * kernel.nr);  // k0 is 0: never split
        return after_bias + kernel.nr * k0;
    }
    const float* weight_scales(int64_t p) const { return panel(p) + kernel.nr; }  // int8
    const int32_t* column_sums(int64_t p) const { return reinterpret_cast<const int32_t*>(panel(p) + 2 * kernel.nr); }

    // Ways of running a layer that are timed on its first calls (see Impl::run): float32 rows that
    // alias split and copied or read in place by half tiles, threads splitting rows or panels.
    mutable runtime::TimedChoice timed_ways;

    // Static int8 (packed from QuantizedConvParams): the input's zero point and sign, the output's.
    bool quantized_io = false;
    QuantizedConvParams io;

    // NHWC. T: float, uint8_t for static int8's 8-bit tensors (no residual, no activation), or
    // uint16_t for bfloat16 inputs (their bits) read by bf16 kernels that convert them; TOut: out's
    // and residual's element (float, uint8_t with T, or uint16_t for a bfloat16 output of those
    // kernels, without a residual).
    template <class T, class TOut = T>
    void run(const BasicTensorView<T>& x, const BasicTensorView<TOut>& out, const BasicTensorView<TOut>* residual,
             const ConvGeometry& geo, Activation act) const;
    // Whether bfloat16 inputs are read as they are (see PackedWeights::reads_bfloat16).
    bool reads_bfloat16() const { return precision == Precision::bf16 && layout == Layout::nhwc && kernel.converts(); }
    void run_nchw(const TensorView& x, const TensorView& out, const TensorView* residual, const ConvGeometry& geo,
                  Activation act) const;
};

PackedWeights::PackedWeights(const float* weight, int64_t out_channels, int64_t in_channels_per_group,
                             int64_t row_stride, int64_t col_stride, const float* bias, int64_t groups, Layout layout,
                             Precision precision)
    : impl_(std::make_unique<Impl>()) {
    Impl& w = *impl_;
    w.set_shape(out_channels, in_channels_per_group, groups, layout, precision);
    // bf16 weights are rounded once, here; the kernels multiply the rounded values exactly (a product
    // of two bf16 values fits in a float) and sum in float32.
    const bool bf16 = precision == Precision::bf16;
    const bool int8 = precision == Precision::int8;
    const auto weight_at = [&](int64_t row, int64_t col) {
        const float value = weight[row * row_stride + col * col_stride];
        return bf16 ? kernels::round_to_bf16(value) : value;
    };
    // int8: each output channel's weights over 127 steps of its largest magnitude (symmetric).
    std::vector<float> int8_scales;
    if (int8) {
        int8_scales.resize(static_cast<size_t>(w.k));
        for (int64_t r = 0; r < w.k; ++r) int8_scales[r] = int8_weight_scale(weight + r * row_stride, w.cg, col_stride);
    }
    if (layout == Layout::nchw) {
        w.kernel = w.isa->main();  // its NR columns are pixels here
        const char* what = "weight (K x C/groups)";
        w.weight_rows = allocate_floats(checked_floats(checked_mul(w.k, w.cg, what), what), what);
        w.row_bias = allocate_floats(static_cast<size_t>(w.k), "bias");
        for (int64_t r = 0; r < w.k; ++r) {
            for (int64_t c = 0; c < w.cg; ++c) w.weight_rows[r * w.cg + c] = weight_at(r, c);
            w.row_bias[r] = bias != nullptr ? bias[r] : 0.0f;
        }
        return;
    }
    w.kernel = w.isa->gemm_for(w.kg, precision);
    const int64_t nr = w.kernel.nr;
    w.panels_per_group = ceil_div(w.kg, nr);
    if (w.kernel.converts() && bf16) {
        w.pack_groups(
            [&](int64_t row, int64_t c) {
                const float value = weight_at(row, c);
                uint32_t bits;
                std::memcpy(&bits, &value, sizeof bits);
                return int32_t{static_cast<int16_t>(bits >> 16)};  // exact: rounded by weight_at
            },
            [&](int64_t row) { return bias != nullptr ? bias[row] : 0.0f; }, [](int64_t) { return 1.0f; });
        return;
    }
    if (int8) {
        w.pack_groups([&](int64_t row, int64_t c) { return quantize_weight(weight[row * row_stride + c * col_stride], int8_scales[row]); },
                    [&](int64_t row) { return bias != nullptr ? bias[row] : 0.0f; },
                    [&](int64_t row) { return int8_scales[row]; });
        return;
    }
    const char* what = "weight (K x C/groups), packed";
    w.panel_stride = nr + checked_mul(nr, w.cg, what);
    w.panels = allocate_floats(checked_floats(checked_mul(w.panel_count(), w.panel_stride, what), what), what);

    const int64_t panel_count = w.panel_count();
    const int pack_threads = runtime::region_threads(panel_count * w.panel_stride > (1 << 16) ? get_num_threads() : 1);
#pragma omp parallel for schedule(static) num_threads(pack_threads) if (pack_threads > 1)
    for (int64_t p = 0; p < panel_count; ++p) {
        const int64_t g = p / w.panels_per_group;
        const int64_t first = g * w.kg + (p % w.panels_per_group) * nr;
        const int64_t width = std::min<int64_t>(nr, (g + 1) * w.kg - first);
        float* dst = w.panels.get() + p * w.panel_stride;
        if (width < nr) std::memset(dst, 0, sizeof(float) * static_cast<size_t>(w.panel_stride));  // zero padding
        for (int64_t n = 0; n < width; ++n) dst[n] = bias != nullptr ? bias[first + n] : 0.0f;
        float* const dst_weights = dst + nr;
        // Transposed in blocks of kPackBlock channels: each source line is read once and the
        // block of panel rows being written stays in L1 (rows of a large weight matrix lie a
        // multiple of 4 KiB apart, so walking down a column would thrash L1's sets).
        constexpr int64_t kPackBlock = 16;
        for (int64_t c0 = 0; c0 < w.cg; c0 += kPackBlock) {
            const int64_t c1 = std::min(w.cg, c0 + kPackBlock);
            for (int64_t n = 0; n < width; ++n) {
                for (int64_t c = c0; c < c1; ++c) dst_weights[nr * c + n] = weight_at(first + n, c);
            }
        }
    }
}

PackedWeights::PackedWeights(const QuantizedConvParams& q, int64_t out_channels, int64_t in_channels_per_group,
                             int64_t groups)
    : impl_(std::make_unique<Impl>()) {
    Impl& w = *impl_;
    w.set_shape(out_channels, in_channels_per_group, groups, Layout::nhwc, Precision::int8);
    const auto positive = [](float scale) { return std::isfinite(scale) && scale > 0.0f; };
    const auto check_zero_point = [](int32_t zero_point, bool is_signed, const char* name) {
        if (zero_point < (is_signed ? -128 : 0) || zero_point > (is_signed ? 127 : 255)) {
            throw std::invalid_argument(std::string(name) + " must lie in its type's range (" +
                                        (is_signed ? "-128..127" : "0..255") + ")");
        }
    };
    if (!positive(q.x_scale) || !positive(q.y_scale)) throw std::invalid_argument("x_scale and y_scale must be finite and > 0");
    check_zero_point(q.x_zero_point, q.x_signed, "x_zero_point");
    check_zero_point(q.y_zero_point, q.y_signed, "y_zero_point");
    for (int64_t r = 0; r < out_channels; ++r) {
        if (!positive(q.weight_scale[r])) throw std::invalid_argument("w_scale must be finite and > 0");
        check_zero_point(q.weight_zero_point[r], q.weight_signed, "w_zero_point");
    }
    w.quantized_io = true;
    w.io = q;
    w.io.weight = nullptr;  // the caller's arrays are not kept
    w.io.weight_scale = nullptr;
    w.io.weight_zero_point = nullptr;
    w.io.bias = nullptr;
    const auto* weight_u8 = static_cast<const uint8_t*>(q.weight);
    const auto* weight_s8 = static_cast<const int8_t*>(q.weight);
    const auto weight_value = [&](int64_t row, int64_t c) {
        const int32_t value = q.weight_signed ? weight_s8[row * w.cg + c] : weight_u8[row * w.cg + c];
        return value - q.weight_zero_point[row];
    };
    w.kernel = w.isa->gemm_for(w.kg, Precision::int8);
    if (w.kernel.converted_value_bytes() == 1) {
        // Byte weights hold -128..127: weights less a zero point beyond that take the kernels of the
        // ISA below, which multiply int16.
        bool fits = true;
        for (int64_t r = 0; r < w.k && fits; ++r) {
            for (int64_t c = 0; c < w.cg && fits; ++c) fits = weight_value(r, c) >= -128 && weight_value(r, c) <= 127;
        }
        if (!fits) {
            w.isa = w.isa->int8_wide_weights;
            w.kernel = w.isa->gemm_for(w.kg, Precision::int8);
        }
    }
    w.panels_per_group = ceil_div(w.kg, static_cast<int64_t>(w.kernel.nr));
    w.pack_groups(
        weight_value,
        [&](int64_t row) {
            const int32_t bias = q.bias != nullptr ? q.bias[row] : 0;
            float slot;
            std::memcpy(&slot, &bias, sizeof slot);
            return slot;
        },
        // As ONNX Runtime computes it: (x_scale * w_scale) / y_scale in float32.
        [&](int64_t row) { return q.x_scale * q.weight_scale[row] / q.y_scale; });
}

PackedWeights::~PackedWeights() = default;

bool PackedWeights::quantized_io() const { return impl_->quantized_io; }

int64_t PackedWeights::out_channels() const { return impl_->k; }
int64_t PackedWeights::in_channels() const { return impl_->cg * impl_->groups; }
int64_t PackedWeights::groups() const { return impl_->groups; }
Layout PackedWeights::layout() const { return impl_->layout; }
Precision PackedWeights::precision() const { return impl_->precision; }
const char* PackedWeights::isa() const { return impl_->isa->isa; }
const char* PackedWeights::kernel_name() const { return impl_->kernel.name; }
bool PackedWeights::current() const { return impl_->family == &detail::family_kernels(impl_->precision); }

std::array<int64_t, 4> PackedWeights::output_shape(const TensorView& x, const ConvGeometry& geometry) const {
    if (impl_->layout == Layout::nchw) {
        return {x.shape[0], out_channels(), conv_output_size(x.shape[2], geometry.pad_h, geometry.stride_h),
                conv_output_size(x.shape[3], geometry.pad_w, geometry.stride_w)};
    }
    return {x.shape[0], conv_output_size(x.shape[1], geometry.pad_h, geometry.stride_h),
            conv_output_size(x.shape[2], geometry.pad_w, geometry.stride_w), out_channels()};
}

void PackedWeights::run_quantized(const QuantizedView& x, const QuantizedView& out, const ConvGeometry& geometry) const {
    if (!impl_->quantized_io) throw std::invalid_argument("run_quantized: these weights were not packed for static int8");
    runtime::check_conv_inputs("qlinear_conv1x1", x, out, geometry, Layout::nhwc, in_channels());
    const TensorView shape_of_x{nullptr, {x.shape[0], x.shape[1], x.shape[2], x.shape[3]}, {}};
    runtime::check_conv_outputs("qlinear_conv1x1", out, static_cast<const QuantizedView*>(nullptr),
                                output_shape(shape_of_x, geometry), Layout::nhwc);
    impl_->run(x, out, static_cast<const QuantizedView*>(nullptr), geometry, Activation::none);
}

void PackedWeights::run(const TensorView& x, const TensorView& out, const TensorView* residual,
                        const ConvGeometry& geometry, Activation activation) const {
    if (impl_->quantized_io) throw std::invalid_argument("run: these weights were packed for static int8 (run_quantized)");
    const Layout layout = impl_->layout;
    runtime::check_conv_inputs("conv1x1", x, out, geometry, layout, in_channels());
    runtime::check_conv_outputs("conv1x1", out, residual, output_shape(x, geometry), layout);
    if (layout == Layout::nchw) {
        impl_->run_nchw(x, out, residual, geometry, activation);
    } else {
        impl_->run(x, out, residual, geometry, activation);
    }
}

bool PackedWeights::reads_bfloat16() const { return impl_->reads_bfloat16(); }

void PackedWeights::run_bfloat16(const BFloat16View& x, const TensorView& out, const TensorView* residual,
                                 const ConvGeometry& geometry, Activation activation) const {
    if (!impl_->reads_bfloat16()) {
        throw std::invalid_argument("run_bfloat16: these weights' kernels do not read bfloat16 (reads_bfloat16())");
    }
    runtime::check_conv_inputs("conv1x1", x, out, geometry, Layout::nhwc, in_channels());
    const TensorView shape_of_x{nullptr, {x.shape[0], x.shape[1], x.shape[2], x.shape[3]}, {}};
    runtime::check_conv_outputs("conv1x1", out, residual, output_shape(shape_of_x, geometry), Layout::nhwc);
    impl_->run(x, out, residual, geometry, activation);
}

void PackedWeights::run_bfloat16(const BFloat16View& x, const BFloat16View& out, const ConvGeometry& geometry,
                                 Activation activation) const {
    if (!impl_->reads_bfloat16()) {
        throw std::invalid_argument("run_bfloat16: these weights' kernels do not read bfloat16 (reads_bfloat16())");
    }
    runtime::check_conv_inputs("conv1x1", x, out, geometry, Layout::nhwc, in_channels());
    const TensorView shape_of_x{nullptr, {x.shape[0], x.shape[1], x.shape[2], x.shape[3]}, {}};
    runtime::check_conv_outputs("conv1x1", out, static_cast<const BFloat16View*>(nullptr),
                                output_shape(shape_of_x, geometry), Layout::nhwc);
    impl_->run(x, out, static_cast<const BFloat16View*>(nullptr), geometry, activation);
}

void conv1x1(const TensorView& x, const float* weight, const float* bias, const TensorView& out,
             const TensorView* residual, const ConvOptions& options) {
    const bool nchw = options.layout == Layout::nchw;
    const int64_t cg = options.groups > 0 ? x.shape[nchw ? 1 : 3] / options.groups : 0;
    const PackedWeights packed(weight, out.shape[nchw ? 1 : 3], cg, cg, 1, bias, options.groups, options.layout,
                               options.precision);
    packed.run(x, out, residual, options.geometry, options.activation);
}

template <class T, class TOut>
void PackedWeights::Impl::run(const BasicTensorView<T>& x, const BasicTensorView<TOut>& out,
                              const BasicTensorView<TOut>* residual, const ConvGeometry& geo, Activation act) const {
    constexpr bool quantized = std::is_same_v<T, uint8_t>;
    constexpr bool float_input = std::is_same_v<T, float>;
    constexpr bool bfloat16_input = std::is_same_v<T, uint16_t>;
    const int64_t batch = out.shape[0], ho = out.shape[1], wo = out.shape[2];
    const int64_t rows = batch * ho * wo;
    if (rows == 0 || k == 0) return;

    // Kernels that read converted activations read the driver's rows, whose stride is never a
    // multiple of 4 KiB; float32 kernels read x's rows in place, or where they alias, copies.
    const bool converted = kernel.converts();
    const bool aliased = !converted && !quantized && aliased_rows(x, geo);
    const int64_t panels_total = panel_count();
    const bool bf16 = precision == Precision::bf16;
    const bool int8 = precision == Precision::int8;
    // Kernels that read converted activations read each group's channels padded to a whole number
    // of the kernel's groups (pairs, quads), and the reduction is never split: a row's values are
    // converted once (int8: with one scale) for all its channels.
    const int64_t value_bytes = converted ? kernel.converted_value_bytes() : int64_t{sizeof(float)};
    const bool quads = converted && kernel.converted_group == 4;
    const int64_t reduction = converted ? kernel.padded_reduction(cg) : cg;
    const int threads =
        runtime::call_threads(2.0 * static_cast<double>(rows) * static_cast<double>(k) * static_cast<double>(cg));
    // Rows that alias are copied where each thread copies each of its rows once and the copies stay
    // in L2: when every panel passes over a band (the weights in one block of panels), or a
    // thread's rows fit half of L2. Where neither holds (a 512 x 3072 -> 768 feed-forward layer:
    // its rows copied up front went to L3 at 2 threads, 8 % slower), kernels of fewer rows than
    // L1 has ways read them in place. The others read them in place in tiles of half their rows,
    // or split the reduction into K blocks short enough for every panel's weights to share half
    // of L2 and copy bands; which is faster depends on the CPU, so the layer times both on its
    // first calls of each shape (TimedChoice). 14x32 AVX-512 tiles, alternating rounds, split and
    // copied against half tiles: on an Intel Xeon, 384 and 512 x 3072 -> 768 +4 % / +2 % at 1 / 2
    // threads, 2048 x 3072 -> 768 even; on AMD Zen 4 (whose 512-bit FMAs are two 256-bit halves,
    // so half tiles keep its FMA unit as busy), 512 x 3072 -> 768 -13 % / -10 %, 28x28x1024->256
    // -7 % / -10 %. (AVX2's 6x16 tiles in place on the Xeon: 9 % faster than split and copied.)
    const int64_t channels = cg * groups;
    const bool thread_rows_fit_l2 =
        ceil_div(rows, int64_t{threads}) * (channels + 16) * int64_t{sizeof(float)} <= detail::cache_sizes().l2 / 2;
    const int64_t weight_bytes = converted ? value_bytes : int64_t{sizeof(float)};
    Blocking blk = choose_blocking(kernel, reduction, panels_total, ceil_div(rows, int64_t{kernel.mr}), weight_bytes,
                                   !converted);
    constexpr int kFewestL1Ways = 8;
    constexpr int64_t kShortestCopiedBlock = 128;
    constexpr int64_t kShallowestPrefetchedOutput = 64;  // channels of a K block (see prefetch_out)
    const int64_t kc_all_panels = detail::cache_sizes().l2 / 2 / (panels_total * kernel.nr * weight_bytes) / 16 * 16;
    const bool may_split = aliased && kernel.mr >= kFewestL1Ways && panels_total > blk.nc_panels &&
                           !thread_rows_fit_l2 && kc_all_panels >= kShortestCopiedBlock;
    // Threads split the layer as the partition's model of work and traffic prefers, or, where
    // that splits the panels, the rows as far as balance allows. On AMD Zen 4 at 2 threads (best
    // median of alternating rounds, partitions forced), rows against panels: 14x14x96->576 1.16x,
    // 14x14x384->96 1.31x, 7x7x576->160 1.20x, 7x7x160->960 1.11x, 14x14x192->64 1.10x,
    // 7x7x512->2048 and 14x14x256->1024 even. Where the two differ the layer times both.
    // (Rows are split one by one, not by tiles: 49 pixels (a 7x7 layer) go 25 + 24 rather than
    // 28 + 21; each thread then cuts its rows into tiles of even heights, see RowTiles.)
    // bf16: every thread rounds the activations it reads (a few vector operations each, like a few
    // columns of multiply-adds), so threads split the rows rather than share them.
    constexpr double kRoundingWork = 8.0;
    const double activation_work = bf16 || int8 ? kRoundingWork : 0.0;
    const std::vector<WorkRange> modelled = runtime::partition(rows, 1, rows, panels_total, kernel.nr, cg, threads,
                                                               activation_work);
    const std::vector<WorkRange> rows_first = runtime::partition(rows, 1, rows, panels_total, kernel.nr, cg, threads,
                                                                 activation_work, true);
    const bool same_partition = modelled.size() == rows_first.size() &&
                                std::equal(modelled.begin(), modelled.end(), rows_first.begin(),
                                           [](const WorkRange& a, const WorkRange& b) {
                                               return a.m_begin == b.m_begin && a.m_end == b.m_end &&
                                                      a.n_begin == b.n_begin && a.n_end == b.n_end;
                                           });
    const int aliased_ways = may_split ? 2 : 1, ways = aliased_ways * (same_partition ? 1 : 2);
    const runtime::TimedChoice::Pick way = timed_ways.pick(rows, threads, ways);
    enum AliasedWay { split_and_copied, half_tiles };
    const int aliased_way = way.way % aliased_ways;
    const std::vector<WorkRange>& ranges = way.way / aliased_ways == 0 ? modelled : rows_first;
    if (may_split && aliased_way == split_and_copied) {
        blk = choose_blocking(kernel, reduction, panels_total, ceil_div(rows, int64_t{kernel.mr}), weight_bytes, true,
                              kc_all_panels);
    }
    const bool restride = aliased && (panels_total <= blk.nc_panels || thread_rows_fit_l2);
    const int64_t mr = aliased && !restride && kernel.mr >= kFewestL1Ways ? kernel.mr / 2 : kernel.mr;

    // Padding reads a row of zeros (static int8: of the input's zero point), so border pixels get
    // bias, residual and activation only.
    const bool padded = geo.pad_h > 0 || geo.pad_w > 0;
    AlignedBuffer zeros;
    if (padded) {
        const size_t count = static_cast<size_t>(std::max<int64_t>(cg * groups, 1));
        zeros = runtime::scratch_floats(ceil_div(count * sizeof(T), sizeof(float)), "the padding's row of zeros");
        std::memset(zeros.get(), quantized ? io.x_zero_point : 0, count * sizeof(T));
    }

    const runtime::BasicRowWalker<T, TOut> walker_template(x, out, residual, geo, reinterpret_cast<const T*>(zeros.get()));
    // (Static int8 writes bytes with plain stores.)
    const bool stream = !quantized && runtime::streams_output(rows * k);

    // Rows are fetched ahead (see prefetch_out) only from arrays larger than L2: smaller ones, such
    // as the bands a fused block or a dense convolution passes in, are in cache already, and
    // fetching them cost converted MobileNetV2 2 % (AMD Zen 4, 1 thread, alternating processes).
    const int64_t l2_bytes = detail::cache_sizes().l2;
    const bool x_beyond_l2 = rows * channels * int64_t{sizeof(T)} > l2_bytes;
    const bool out_beyond_l2 = rows * k * int64_t{sizeof(TOut)} > l2_bytes;

    runtime::CallGuard guard;
    const int64_t mc_rows = blk.mc_tiles * mr;

    // Within an M block, rows are taken a band at a time: the band's activations (band x kc, a
    // quarter of L1) stay in L1 while every panel of the block passes over them, so each panel's
    // weights come from L2 once per band rather than once per tile. Deep reductions leave room for
    // one tile only. Measured on Zen 3 (AVX2, 6x16), against a band of one tile, geometric mean of 16
    // MobileNet/ResNet layers: +2.5 % at 1 thread, +6 % at 2; 112x112x16->96 +36 %, 14x14x64->384 +18 % / +37 %.
    const int64_t activation_bytes = value_bytes;
    const int64_t band_rows = std::clamp<int64_t>(
        detail::cache_sizes().l1d / 4 / (blk.kc * activation_bytes) / mr * mr, mr, kMaxBandRows / mr * mr);
    const int64_t band_tiles = band_rows / mr;

    const char* const what_rounded = "activations rounded to bf16";
    const char* const what_partial = "partial sums of a split reduction";
    const char* const what_quantized = "activations quantized to int8";
    // Bytes of a converted pixel row in the buffer, and of a group's part of it: a stride of whole
    // cache lines that is no multiple of 4 KiB (rows that far apart would share L1's sets: see aliased_rows).
    const int64_t group_bytes = reduction * value_bytes;
    const int64_t row_bytes = [&] {
        const int64_t bytes = ceil_div(groups * group_bytes, int64_t{64}) * 64;
        return bytes % 4096 == 0 ? bytes + 64 : bytes;
    }();
    // int8: a pixel row's values quantized, each group with its own scale (and for quads zero
    // point); the scales of row i of a buffer of `capacity` rows are scales[g * capacity + i], so a
    // tile's rows have them in a run, and the zero points alike.
    // Static int8: the row's 8-bit values as the kernels read them (no scales; one zero point).
    // bf16 pairs: the row's values rounded to bfloat16, each group padded alike.
    // quantize_rows: `count` rows, row m read from sources[m] + offset, into consecutive rows of a
    // buffer from `values` on, their scales and zero points from `scales` and `zero_points` on.
    const size_t row_values = static_cast<size_t>(row_bytes / value_bytes);
    // Rows that are already what the kernels read are read in place where each group's channels are
    // whole groups of the kernel (reduction == cg) and pixels do not alias (see aliased_rows): static
    // int8 quads from uint8 rows (the bytes, with the input's zero point), and bfloat16 pairs
    // (copying them a row at a time had made bfloat16 input slower than float32 input on narrow
    // layers: 1x112x112x32->16 at 1 thread, AMD Zen 4, 98 -> 152 GFLOP/s read in place).
    const bool read_in_place = reduction == cg && !kernel.loads_row_blocks && !aliased_rows(x, geo) &&
                               ((quantized && quads && !io.x_signed) || (bf16 && bfloat16_input));
    const auto quantize_rows = [&](const T* const* sources, ptrdiff_t offset, int64_t count, char* values,
                                   float* scales, int32_t* zero_points, int64_t capacity) {
        const size_t n = static_cast<size_t>(cg), padded_n = static_cast<size_t>(reduction);
        for (int64_t g = 0; g < groups; ++g) {
            if (bf16) {
                int16_t* const dst = reinterpret_cast<int16_t*>(values + g * group_bytes);
                if constexpr (bfloat16_input) {
                    for (int64_t m = 0; m < count; ++m) {  // bfloat16 already: copied
                        std::memcpy(dst + m * row_values, sources[m] + offset + g * cg, n * sizeof(uint16_t));
                        std::memset(dst + m * row_values + n, 0, (padded_n - n) * sizeof(uint16_t));
                    }
                } else if constexpr (float_input) {
                    isa->round_rows_to_bf16_pairs(sources, offset + g * cg, static_cast<size_t>(count), n, dst,
                                                  row_values, padded_n);
                }
            } else if constexpr (quantized) {
                for (int64_t m = 0; m < count; ++m) {
                    isa->widen_row_int8(sources[m] + offset + g * cg, n, io.x_signed, io.x_zero_point,
                                        values + m * row_bytes + g * group_bytes, padded_n);
                }
            } else if constexpr (float_input) {
                isa->quantize_rows_int8(sources, offset + g * cg, static_cast<size_t>(count), n, values + g * group_bytes,
                                        row_values, padded_n, scales + g * capacity,
                                        quads ? zero_points + g * capacity : nullptr);
            }
        }
    };
    const auto work = [&](const WorkRange& range) {
        runtime::BasicRowWalker<T, TOut> walker = walker_template;
        // bf16: activations are rounded once for all the panels that pass over them. Usually all
        // of a thread's panels pass over a band while it is in L1, and the band is rounded there;
        // where the weights take several blocks of panels (each read from L2 by all the rows), the
        // thread's rows are rounded once, up front, into a buffer of their own.
        // int8 likewise, with the quantized rows and their scales (and zero points), and float32
        // rows that alias (see aliased_rows), copied.
        const int64_t range_rows = range.m_end - range.m_begin;
        // (A band's rows of float32 span at most the channels, and take a cache line more where they alias.)
        const int64_t row_floats = converted ? row_bytes / int64_t{sizeof(float)} : unaliased_stride(channels);
        const int64_t buffer_row_floats = converted ? row_floats : channels + 16;
        const bool round_range = (bf16 || int8 || restride) && !read_in_place && range.n_end - range.n_begin > blk.nc_panels &&
                                 range_rows <= kMaxRoundedRangeFloats / std::max<int64_t>(row_floats, 1);
        // (Whole tiles of rows: kernels that load row blocks read every row of a tile's block.)
        const int64_t buffer_rows = round_range ? ceil_div(range_rows, mr) * mr : band_rows;
        const char* const what_buffer = int8 ? what_quantized : bf16 ? what_rounded : "activations, copied a band at a time";
        runtime::AlignedBuffer rounded, row_scales, row_zero_points;
        GemmTileArgs args{};
        args.a_converted_stride = static_cast<size_t>(row_bytes);
        const kernels::ThreadSetup thread_setup(kernel);
        if ((bf16 || int8 || restride) && !read_in_place) {
            rounded = runtime::scratch_floats(
                checked_floats(checked_mul(buffer_rows, buffer_row_floats, what_buffer), what_buffer), what_buffer);
            if (kernel.loads_row_blocks) {
                // The rows a last, partial block reads past the thread's rows hold zeros, not
                // whatever the allocator left (their results are dropped either way).
                const int64_t first_unused = round_range ? range_rows : 0;
                std::memset(rounded.get() + first_unused * row_floats, 0,
                            static_cast<size_t>((buffer_rows - first_unused) * row_floats) * sizeof(float));
            }
        }
        if (int8 && !quantized) {
            row_scales = runtime::scratch_floats(
                checked_floats(checked_mul(buffer_rows, groups, what_buffer), what_buffer), what_buffer);
        }
        if (quads) {
            static_assert(sizeof(int32_t) == sizeof(float), "zero points share the float buffers");
            const int64_t count = checked_mul(buffer_rows, groups, what_buffer);
            row_zero_points = runtime::scratch_floats(checked_floats(count, what_buffer), what_buffer);
            // Static int8: every row's bytes carry the input's zero point (made unsigned).
            const int32_t input_zero_point = io.x_zero_point + (io.x_signed ? 128 : 0);
            if (quantized) std::fill_n(reinterpret_cast<int32_t*>(row_zero_points.get()), count, input_zero_point);
        }
        char* const converted_values = reinterpret_cast<char*>(rounded.get());
        int32_t* const zero_points = reinterpret_cast<int32_t*>(row_zero_points.get());
        if (round_range) {
            const T* source_rows[kMaxBandRows];
            TOut* unused_out[kMaxBandRows];
            const TOut* unused_res[kMaxBandRows];
            walker.seek(range.m_begin);
            for (int64_t m0 = range.m_begin; m0 < range.m_end; m0 += kMaxBandRows) {
                const int64_t count = std::min(kMaxBandRows, range.m_end - m0);
                walker.next(count, 0, source_rows, unused_out, unused_res);
                const int64_t first = m0 - range.m_begin;
                if (converted) {
                    quantize_rows(source_rows, 0, count, converted_values + first * row_bytes,
                                  int8 && !quantized ? row_scales.get() + first : nullptr,
                                  quads && !quantized ? zero_points + first : nullptr, buffer_rows);
                } else if constexpr (float_input) {
                    copy_rows(*isa, source_rows, count, channels, rounded.get() + first * row_floats, row_floats, bf16);
                }
            }
        }
        const RowTiles tiles(range_rows, mr, !kernel.loads_row_blocks);
        const auto tile_row = [&](int64_t t) { return range.m_begin + tiles.start(t); };
        // A split reduction's partial sums: an M block's rows x the block of panels' columns.
        const int64_t partial_stride = blk.nc_panels * kernel.nr;
        const AlignedBuffer partial = blk.k_blocks > 1 ? runtime::scratch_floats(checked_floats(
            checked_mul(mc_rows, partial_stride, what_partial), what_partial), what_partial) : AlignedBuffer{};
        args.partial_stride = static_cast<size_t>(partial_stride);
        const void* converted_rows[kMaxBandRows];
        const float* band_scales = nullptr;  // int8: the band's first row's scale, of the current group
        const int32_t* band_zero_points = nullptr;  // quads: likewise, its zero point
        // The rows of the band being computed and of the next one (walked a band ahead, so that its
        // activations can be prefetched), used in turn.
        struct BandRows {
            TOut* out[kMaxBandRows];
            const TOut* res[kMaxBandRows];
            const T* a[kMaxBandRows];
        } band_rows_of[2];
        if constexpr (quantized) {
            const int32_t low = io.y_signed ? -128 : 0, high = io.y_signed ? 127 : 255;
            args.out_min = static_cast<float>(low - io.y_zero_point);
            args.out_max = static_cast<float>(high - io.y_zero_point);
            args.out_zero_point = io.y_zero_point;
            args.out_signed = io.y_signed;
        }

        for (int64_t pb = range.n_begin; pb < range.n_end; pb += blk.nc_panels) {
            const int64_t pe = std::min(range.n_end, pb + blk.nc_panels);
            // M blocks and bands are whole tiles; tile_row(t) is tile t's first row.
            for (int64_t tb = 0; tb < tiles.count(); tb += blk.mc_tiles) {
                const int64_t te = std::min(tiles.count(), tb + blk.mc_tiles), mb = tile_row(tb);
                for (int64_t kb = 0; kb < blk.k_blocks; ++kb) {
                    const int64_t k0 = begin_k_block(args, blk, kb, reduction, act, stream);
                    walker.seek(mb);
                    const int64_t first_group = pb / panels_per_group, first_j = pb % panels_per_group;
                    const int64_t a_offset = first_group * cg + k0, kc_floats = static_cast<int64_t>(args.kc);
                    int current = 0;
                    walker.next(tile_row(std::min(te, tb + band_tiles)) - mb, a_offset, band_rows_of[0].a,
                                band_rows_of[0].out, band_rows_of[0].res);
                    for (int64_t bt = tb; bt < te; bt += band_tiles, current ^= 1) {
                        const int64_t band = tile_row(bt), bt_end = std::min(te, bt + band_tiles);
                        const int64_t rows_in_band = tile_row(bt_end) - band;
                        const T** a_rows = band_rows_of[current].a;
                        TOut** out_rows = band_rows_of[current].out;
                        const TOut** res_rows = band_rows_of[current].res;
                        if (converted) {
                            // The band's rows converted (here, or up front), from the first panel's group on.
                            const int64_t first_row = round_range ? band - range.m_begin : 0;
                            if (!round_range && !read_in_place) {
                                quantize_rows(a_rows, -a_offset, rows_in_band, converted_values,
                                              int8 && !quantized ? row_scales.get() : nullptr,
                                              quads && !quantized ? zero_points : nullptr, buffer_rows);
                            }
                            for (int64_t m = 0; m < rows_in_band; ++m) {
                                converted_rows[m] = read_in_place ? static_cast<const void*>(a_rows[m])
                                                                  : converted_values + (first_row + m) * row_bytes + first_group * group_bytes;
                            }
                            if (int8 && !quantized) band_scales = row_scales.get() + first_group * buffer_rows + first_row;
                            if (quads) band_zero_points = zero_points + first_group * buffer_rows + first_row;
                        } else if constexpr (float_input) {
                          if (round_range) {
                            for (int64_t m = 0; m < rows_in_band; ++m) {
                                a_rows[m] = rounded.get() + (band - range.m_begin + m) * row_floats + a_offset;
                            }
                        } else if (bf16 || restride) {
                            // The channels the panels pb..pe-1 read: their groups' from this K block on.
                            const int64_t span = ((pe - 1) / panels_per_group - first_group) * cg + kc_floats;
                            const int64_t stride = unaliased_stride(span);
                            copy_rows(*isa, a_rows, rows_in_band, span, rounded.get(), stride, bf16);
                            for (int64_t m = 0; m < rows_in_band; ++m) a_rows[m] = rounded.get() + m * stride;
                          }
                        }
                        // The next band's activations, fetched while this band computes: each row is
                        // a short run of cache lines (kc floats), too short for the hardware's
                        // stream prefetchers to pick up when rows come from L3 or memory. Rows that
                        // follow each other in memory (a stride-1 layer's rows read whole) are one
                        // stream, which the hardware follows well enough where the band's panels are
                        // few: there the prefetches would only cost issue slots (6 % of a
                        // 112x112x32->16 layer's time on Zen 4, data in L2). Under 64 columns or
                        // more they cost nothing measurable, and a 56x56x64->256 layer whose arrays
                        // came from memory took 2.2 -> 1.8 ms (AMD Zen 4, 1 thread).
                        const int64_t next_rows = tile_row(std::min(te, bt_end + band_tiles)) - tile_row(bt_end);
                        if (next_rows > 0) {
                            BandRows& next = band_rows_of[current ^ 1];
                            walker.next(next_rows, a_offset, next.a, next.out, next.res);
                            bool one_stream = true;
                            for (int64_t m = 1; m < next_rows && one_stream; ++m) {
                                one_stream = next.a[m] == next.a[m - 1] + kc_floats;
                            }
                            const int64_t bytes = kc_floats * static_cast<int64_t>(sizeof(T));
                            const bool wide = (pe - pb) * kernel.nr >= 64 && x_beyond_l2;
                            for (int64_t m = 0; m < next_rows && (!one_stream || wide); ++m) {
                                prefetch_to_l2<false>(next.a[m], bytes);
                            }
                        }
                        // The epilogue's rows, too: a tile writes (and reads the residual of) short runs of
                        // many rows far apart, which the hardware's prefetchers do not follow from L3 or
                        // memory, as happens inside a network. Only from arrays beyond L2 (see
                        // out_beyond_l2), and output rows only over K blocks of 64 channels or more: where
                        // the output was in L3 anyway, fetching it cost 9-10 % of a 112x112x16->96 or
                        // 56x56x24->144 layer's time on Zen 4, 2-4 % of a 56x56x64->256 one's. That layer +
                        // residual + ReLU with its arrays in memory, 1 thread: 2.2 -> 1.6 ms; inside
                        // ResNet-50 (1.55 ms, against 1.2 ms alone) 1.33 ms. The tile kernels' own
                        // prefetches at their start, a k loop ahead, which this replaced, added nothing
                        // beside it. (Streamed output skips the cache.)
                        const bool prefetch_out = args.final && !stream && out_beyond_l2 && kc_floats >= kShallowestPrefetchedOutput;
                        const bool prefetch_residual = args.final && !stream && out_beyond_l2 && residual != nullptr;
                        int64_t group = first_group, j = first_j;
                        // Panels pb..pe-1, walked as (group, panel within group) without divisions.
                        for (int64_t p = pb; p < pe; ++p) {
                            const int64_t col = group * kg + j * kernel.nr;
                            args.nr = static_cast<size_t>(std::min<int64_t>(kernel.nr, (group + 1) * kg - col));
                            args.col = static_cast<size_t>(col);
                            args.bias = kb == 0 ? panel(p) : nullptr;
                            args.w = panel_weights(p, k0);
                            args.col_scale = weight_scales(p);
                            args.col_sums = column_sums(p);
                            if (prefetch_out || prefetch_residual) {
                                // The output and residual the next panel's tiles will touch: this band's
                                // rows under the next panel, or after the last one, the next band's
                                // under the first (close enough to stay in L1 until used).
                                const bool last_panel = p + 1 == pe;
                                const int64_t next_col = last_panel ? first_group * kg + first_j * kernel.nr
                                                         : j + 1 == panels_per_group ? (group + 1) * kg
                                                                                     : col + kernel.nr;
                                const int64_t next_group_end = (next_col / kg + 1) * kg;
                                const int64_t bytes =
                                    std::min<int64_t>(kernel.nr, next_group_end - next_col) * int64_t{sizeof(TOut)};
                                const BandRows& rows_ahead = band_rows_of[last_panel ? current ^ 1 : current];
                                const int64_t count = last_panel ? next_rows : rows_in_band;
                                for (int64_t m = 0; m < count; ++m) {
                                    if (prefetch_out) prefetch_to_l2<true>(rows_ahead.out[m] + next_col, bytes);
                                    if (prefetch_residual) prefetch_to_l2<false>(rows_ahead.res[m] + next_col, bytes);
                                }
                            }
                            if constexpr (quantized) args.bias_int32 = reinterpret_cast<const int32_t*>(panel(p));
                            for (int64_t t = bt; t < bt_end; ++t) {
                                const int64_t row = tile_row(t) - band, rows_in_tile = tile_row(t + 1) - tile_row(t);
                                args.a_converted = converted_rows + row;
                                args.row_zero_point = quads ? band_zero_points + row : nullptr;
                                if constexpr (quantized) {
                                    args.c_quantized = out_rows + row;
                                } else {
                                    if constexpr (float_input) args.a = a_rows + row;
                                    args.row_scale = int8 ? band_scales + row : nullptr;
                                    if constexpr (std::is_same_v<TOut, float>) {
                                        args.c = out_rows + row;
                                        args.residual = args.final && residual != nullptr ? res_rows + row : nullptr;
                                    } else {
                                        args.c_bfloat16 = out_rows + row;
                                    }
                                    if (partial) args.partial = partial.get() + (band - mb + row) * partial_stride + (p - pb) * kernel.nr;
                                }
                                kernel.by_rows[rows_in_tile - 1](args);
                            }
                            if (++j == panels_per_group && p + 1 < pe) {
                                j = 0;
                                ++group;
                                for (int64_t m = 0; m < rows_in_band; ++m) a_rows[m] += cg;  // the next group's channels
                                if (converted) {
                                    for (int64_t m = 0; m < rows_in_band; ++m) {
                                        converted_rows[m] = static_cast<const char*>(converted_rows[m]) + group_bytes;
                                    }
                                    if (int8 && !quantized) band_scales += buffer_rows;
                                    if (quads) band_zero_points += buffer_rows;
                                }
                            }
                        }
                    }
                }
            }
        }
    };

    const auto start = std::chrono::steady_clock::now();
    runtime::run_ranges(ranges, stream, work);
    if (way.timed) {
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        timed_ways.record(rows, threads, ways, way.way, seconds);
    }
}

// NCHW: per image, Y[K, P] = W[K, C] X[C, P] over the P = Ho * Wo output pixels. Rows of a tile
// are output channels (weight rows read in place, one bias per row); columns are NR pixels whose
// input values are gathered, once per panel, into a zero-padded kc x NR block (this also applies
// stride and padding). Output rows are contiguous planes, written in place.
void PackedWeights::Impl::run_nchw(const TensorView& x, const TensorView& out, const TensorView* residual,
                                   const ConvGeometry& geo, Activation act) const {
    const int64_t batch = out.shape[0], ho = out.shape[2], wo = out.shape[3], pixels = ho * wo;  // NCHW
    if (batch * pixels == 0 || k == 0) return;
    const int64_t mr = kernel.mr, nr = kernel.nr;
    const int64_t panels_per_image = ceil_div(pixels, nr);
    const int64_t pixel_panels = batch * panels_per_image;
    const int64_t tiles_per_group = ceil_div(kg, mr);
    const int64_t channel_tiles = groups * tiles_per_group;
    const Blocking blk = choose_blocking(kernel, cg, channel_tiles, pixel_panels);
    const bool stream = runtime::streams_output(batch * k * pixels);

    runtime::CallGuard guard;
    // Tiles of output channels play the role of NHWC's pixel tiles, pixel panels that of weight panels.
    const std::vector<WorkRange> ranges =
        runtime::partition(channel_tiles, mr, k, pixel_panels, nr, cg, runtime::call_threads(2.0 * static_cast<double>(batch * pixels) * static_cast<double>(k) * static_cast<double>(cg)));

    const auto work = [&](const WorkRange& range) {
        std::vector<float> block(static_cast<size_t>(std::max<int64_t>(blk.kc, 1) * nr));
        // A split reduction's partial sums: the range's channel tiles x one panel of pixels.
        const char* what_partial = "partial sums of a split reduction";
        const AlignedBuffer partial = blk.k_blocks > 1 ? runtime::scratch_floats(checked_floats(
            checked_mul((range.m_end - range.m_begin) * mr, nr, what_partial), what_partial), what_partial) : AlignedBuffer{};
        // Input offset of each pixel of the panel (negative strides make negative offsets), or
        // kPadding for pixels in the padding or past the last one.
        constexpr int64_t kPadding = std::numeric_limits<int64_t>::min();
        std::vector<int64_t> offsets(static_cast<size_t>(nr));
        const float* a_rows[kMaxMR];
        float* out_rows[kMaxMR];
        const float* res_rows[kMaxMR];
        GemmTileArgs args{};
        args.a = a_rows;
        args.c = out_rows;
        args.w = block.data();
        args.partial_stride = static_cast<size_t>(nr);
        for (int64_t u = range.n_begin; u < range.n_end; ++u) {
            const int64_t n = u / panels_per_image, p0 = (u % panels_per_image) * nr;
            args.nr = static_cast<size_t>(std::min(nr, pixels - p0));
            args.col = static_cast<size_t>(p0);
            for (int64_t t = 0; t < nr; ++t) {
                const int64_t p = p0 + t, ih = (p / wo) * geo.stride_h - geo.pad_h, iw = (p % wo) * geo.stride_w - geo.pad_w;
                const bool inside = p < pixels && ih >= 0 && ih < x.shape[2] && iw >= 0 && iw < x.shape[3];
                offsets[t] = inside ? ih * x.strides[2] + iw * x.strides[3] : kPadding;
            }
            int64_t packed_group = -1, packed_kb = -1;
            for (int64_t kb = 0; kb < blk.k_blocks; ++kb) {
                const int64_t k0 = begin_k_block(args, blk, kb, cg, act, stream);
                for (int64_t tile = range.m_begin; tile < range.m_end; ++tile) {
                    const int64_t group = tile / tiles_per_group;
                    const int64_t first = group * kg + (tile % tiles_per_group) * mr;
                    const int64_t count = std::min(mr, (group + 1) * kg - first);
                    if (group != packed_group || kb != packed_kb) {
                        const float* image = x.data + n * x.strides[0] + (group * cg + k0) * x.strides[1];
                        for (size_t c = 0; c < args.kc; ++c) {
                            const float* plane = image + static_cast<int64_t>(c) * x.strides[1];
                            float* dst = block.data() + c * static_cast<size_t>(nr);
                            for (int64_t t = 0; t < nr; ++t) dst[t] = offsets[t] != kPadding ? plane[offsets[t]] : 0.0f;
                            if (precision == Precision::bf16) isa->round_to_bf16(dst, dst, static_cast<size_t>(nr));
                        }
                        packed_group = group;
                        packed_kb = kb;
                    }
                    for (int64_t m = 0; m < count; ++m) {
                        a_rows[m] = weight_rows.get() + (first + m) * cg + k0;
                        out_rows[m] = out.data + n * out.strides[0] + (first + m) * out.strides[1];
                        if (residual != nullptr) {
                            res_rows[m] = residual->data + n * residual->strides[0] + (first + m) * residual->strides[1];
                        }
                    }
                    args.row_bias = kb == 0 ? row_bias.get() + first : nullptr;
                    args.residual = args.final && residual != nullptr ? res_rows : nullptr;
                    if (partial) args.partial = partial.get() + (tile - range.m_begin) * mr * nr;
                    kernel.by_rows[count - 1](args);
                }
            }
        }
    };

    runtime::run_ranges(ranges, stream, work);
}

}  // namespace pwcpu
