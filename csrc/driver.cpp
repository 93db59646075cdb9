// The driver: weight packing, cache blocking, threading and the fused epilogue's bookkeeping.
// It knows kernels only through the contract in kernels/ukernel.hpp and the dispatch table.
#include <dirent.h>
#include <omp.h>
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dispatch.hpp"
#include "pwcpu/pwcpu.hpp"

namespace pwcpu {

using kernels::GemmKernel;
using kernels::GemmTileArgs;
using kernels::GemmTileFn;

namespace {

constexpr int kMaxMR = 32;
// Rows of a band (see Impl::run).
constexpr int64_t kMaxBandRows = 256;

// Packed-weight buffers. conv1x1 packs on every call, so they come from allocate_buffer, which
// keeps the last one freed: page faults on fresh pages cost more than packing itself.
struct BufferFree {
    size_t bytes;
    void operator()(float* p) const { free_buffer(p, bytes, BufferKind::packed_weights); }
};
using AlignedBuffer = std::unique_ptr<float[], BufferFree>;

AlignedBuffer allocate_floats(size_t count, const char* what) {
    const size_t bytes = count * sizeof(float);
    return AlignedBuffer(static_cast<float*>(allocate_buffer(bytes, BufferKind::packed_weights, what)), BufferFree{bytes});
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a * b for sizes that come from the caller (broadcast views make absurd extents cheap): an
// overflow is an error naming what was being sized, never a wrapped size and a short buffer.
int64_t checked_mul(int64_t a, int64_t b, const char* what) {
    int64_t product = 0;
    if (__builtin_mul_overflow(a, b, &product)) throw std::length_error(std::string(what) + " is too large to describe");
    return product;
}

// A buffer of `count` floats must also be describable in bytes.
size_t checked_floats(int64_t count, const char* what) {
    return static_cast<size_t>(checked_mul(count, static_cast<int64_t>(sizeof(float)), what)) / sizeof(float);
}

// ---- threads --------------------------------------------------------------------------------

// GNU OpenMP cannot run a parallel region in a child forked after the parent started its thread
// pool: the child waits forever for threads that were not copied. The pool may have been started
// by anyone sharing the OpenMP runtime (PyTorch among them), so a fork from a parent that had more
// than one thread (or whose threads cannot be counted) leaves the child on one thread; a child of
// a single-threaded parent, where no pool can exist, runs normally. Spawned processes start afresh.
std::atomic<bool> parent_had_threads{true};
std::atomic<bool> forked_after_threads{false};

// Threads of this process, from /proc; 0 when they cannot be counted.
int64_t process_thread_count() {
    DIR* tasks = opendir("/proc/self/task");
    if (tasks == nullptr) return 0;
    int64_t count = 0;
    while (const dirent* entry = readdir(tasks)) count += entry->d_name[0] != '.';
    closedir(tasks);
    return count;
}

void before_fork() { parent_had_threads.store(process_thread_count() != 1, std::memory_order_relaxed); }

void on_fork_child() {
    if (parent_had_threads.load(std::memory_order_relaxed)) forked_after_threads.store(true, std::memory_order_relaxed);
}

[[maybe_unused]] const bool fork_handlers_registered = [] {
    return pthread_atfork(before_fork, nullptr, on_fork_child) == 0;
}();

// Threads for a parallel region of up to `wanted` threads.
int region_threads(int wanted) {
    return wanted <= 1 || forked_after_threads.load(std::memory_order_relaxed) ? 1 : wanted;
}

// pwcpu's own thread count, never above OpenMP's setting for the calling thread (OMP_NUM_THREADS,
// threadpoolctl, else the cores), which it leaves alone: PyTorch and other users of the process's
// OpenMP runtime keep theirs. 0 = follow OpenMP's setting. A per-thread override comes first.
std::atomic<int> requested_threads{0};
thread_local int scoped_threads = 0;
// Calls in flight, so that concurrent callers share the cores instead of multiplying threads.
std::atomic<int> calls_in_flight{0};

struct CallGuard {
    CallGuard() { calls_in_flight.fetch_add(1, std::memory_order_relaxed); }
    ~CallGuard() { calls_in_flight.fetch_sub(1, std::memory_order_relaxed); }
};

// Flush denormals to zero for the duration of a call on this thread, then restore the caller's
// floating-point state: denormal inputs must not make a call slow. (x86; elsewhere a no-op.)
#if defined(__x86_64__) || defined(__i386__)
struct DenormalsAreZero {
    unsigned saved = _mm_getcsr();
    DenormalsAreZero() { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
    ~DenormalsAreZero() { _mm_setcsr(saved); }
};
#else
struct DenormalsAreZero {};
#endif

// Non-temporal stores are weakly ordered: each thread fences them before its work counts as done.
void fence_streaming_stores() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_sfence();
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

// ---- blocking -------------------------------------------------------------------------------

struct Blocking {
    int64_t kc;          // reduction length per K block
    int64_t k_blocks;
    int64_t nc_panels;   // panels whose kc x NR weights are kept in L2 together
    int64_t mc_tiles;    // tiles per M block when the reduction is split
};

Blocking choose_blocking(const GemmKernel& kernel, int64_t cg, int64_t panels, int64_t tiles) {
    const detail::CacheSizes& cache = detail::cache_sizes();
    const int64_t bytes = sizeof(float);
    // The reduction is split only when an MR x kc tile of activations would crowd L2: streaming
    // each row of the tile from L2 costs less than re-reading and re-writing partial outputs, so
    // on a 1 MiB L2 even ResNet's C = 2048 and a 3072-wide feed-forward layer run unsplit.
    const int64_t kc_max = std::max<int64_t>(256, cache.l2 / 4 / (kernel.mr * bytes) / 16 * 16);
    Blocking b{};
    b.k_blocks = cg <= kc_max ? 1 : ceil_div(cg, kc_max);
    b.kc = std::max<int64_t>(1, ceil_div(cg, b.k_blocks));
    // The weights of a block of panels stream from L2, shared by all tiles.
    b.nc_panels = std::clamp<int64_t>(cache.l2 / 2 / (b.kc * kernel.nr * bytes), 1, std::max<int64_t>(panels, 1));
    // With a split reduction, partial outputs of an M block must still be in L2 for the next K block.
    b.mc_tiles = b.k_blocks == 1
                     ? std::max<int64_t>(tiles, 1)
                     : std::max<int64_t>(1, cache.l2 / 2 / (b.nc_panels * kernel.nr * kernel.mr * bytes));
    return b;
}

// Rows of an NHWC tile lie one pixel apart in x. When that distance is a multiple of 4 KiB (C of
// 1024, 2048, 3072...), every row falls in the same L1 set (4 KiB is sets x line size on the
// 32 KiB 8-way and 48 KiB 12-way L1s of current x86 cores), and a tile of more rows than the set
// has ways evicts its own rows on every k step. Such layers take tiles of half the rows: the
// kernel has a variant for every row count. Measured on Zen 4 (AVX-512, 14x32 kernel, 1 thread):
// 14x14x1024->256 82 -> 108 GFLOP/s, 7x7x2048->512 72 -> 106, ffn 512x3072->768 84 -> 110 (of 118).
int64_t tile_rows(const GemmKernel& kernel, const TensorView& x, const ConvGeometry& geo) {
    constexpr int64_t kSetPeriodBytes = 4096, kFewestL1Ways = 8;
    const int64_t pixel_bytes = std::abs(x.strides[2] * geo.stride_w) * static_cast<int64_t>(sizeof(float));
    const bool aliased = pixel_bytes != 0 && pixel_bytes % kSetPeriodBytes == 0;
    return aliased && kernel.mr >= kFewestL1Ways ? kernel.mr / 2 : kernel.mr;
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

// Maps output pixels, in (n, oh, ow) order, to the rows a tile reads and writes: the input row
// (or a row of zeros where the pixel falls in the padding), the output row and the residual row.
// The first pixel's position costs divisions, the rest are increments.
class RowWalker {
public:
    RowWalker(const TensorView& x, const TensorView& out, const TensorView* residual, const ConvGeometry& geo,
              const float* zeros)
        : x_(x.data), out_(out.data), res_(residual != nullptr ? residual->data : nullptr), zeros_(zeros),
          h_(x.shape[1]), w_(x.shape[2]), ho_(out.shape[1]), wo_(out.shape[2]),
          xs0_(x.strides[0]), xs1_(x.strides[1]), xs2_(x.strides[2]),
          os0_(out.strides[0]), os1_(out.strides[1]), os2_(out.strides[2]),
          rs0_(residual != nullptr ? residual->strides[0] : 0), rs1_(residual != nullptr ? residual->strides[1] : 0),
          rs2_(residual != nullptr ? residual->strides[2] : 0),
          sh_(geo.stride_h), sw_(geo.stride_w), ph_(geo.pad_h), pw_(geo.pad_w) {}

    // Position the walker at output pixel `first`.
    void seek(int64_t first) {
        n_ = first / (ho_ * wo_);
        oh_ = first / wo_ - n_ * ho_;
        ow_ = first % wo_;
        line_ = line_at(n_, oh_);
    }

    // Rows of the next `count` pixels, input rows offset by `channel` (never steps past the output).
    // Pixels of one output row are equally spaced in every tensor, so each run of them along the
    // row is filled by strided loops; only pixels in the horizontal padding need a test.
    void next(int64_t count, int64_t channel, const float** x_rows, float** out_rows, const float** res_rows) {
        for (int64_t m = 0; m < count;) {
            if (ow_ == wo_) {
                ow_ = 0;
                if (++oh_ == ho_) {
                    oh_ = 0;
                    ++n_;
                }
                line_ = line_at(n_, oh_);
            }
            const int64_t run = std::min(count - m, wo_ - ow_);
            float* const out = line_.out + ow_ * os2_;
            for (int64_t i = 0; i < run; ++i) out_rows[m + i] = out + i * os2_;
            if (res_ != nullptr) {
                const float* const res = line_.res + ow_ * rs2_;
                for (int64_t i = 0; i < run; ++i) res_rows[m + i] = res + i * rs2_;
            }
            const int64_t iw0 = ow_ * sw_ - pw_, iw_last = iw0 + (run - 1) * sw_;
            if (line_.x != nullptr && iw0 >= 0 && iw_last < w_) {
                const float* const x = line_.x + iw0 * xs2_ + channel;
                const int64_t step = sw_ * xs2_;
                for (int64_t i = 0; i < run; ++i) x_rows[m + i] = x + i * step;
            } else {
                for (int64_t i = 0; i < run; ++i) {
                    const int64_t iw = iw0 + i * sw_;
                    x_rows[m + i] = (line_.x != nullptr && iw >= 0 && iw < w_ ? line_.x + iw * xs2_ : zeros_) + channel;
                }
            }
            ow_ += run;
            m += run;
        }
    }

private:
    struct Line {
        const float* x;  // null: the whole output row lies in the vertical padding
        float* out;
        const float* res;
    };

    Line line_at(int64_t n, int64_t oh) const {
        const int64_t ih = oh * sh_ - ph_;
        return {ih >= 0 && ih < h_ ? x_ + n * xs0_ + ih * xs1_ : nullptr, out_ + n * os0_ + oh * os1_,
                res_ != nullptr ? res_ + n * rs0_ + oh * rs1_ : nullptr};
    }

    const float* x_;
    float* out_;
    const float* res_;
    const float* zeros_;
    int64_t h_, w_, ho_, wo_;
    int64_t xs0_, xs1_, xs2_, os0_, os1_, os2_, rs0_, rs1_, rs2_;
    int64_t sh_, sw_, ph_, pw_;
    int64_t n_ = 0, oh_ = 0, ow_ = 0;
    Line line_{};
};

// A rectangle of the (M units x N units) grid given to one thread. NHWC: output pixels x weight
// panels; NCHW: tiles of output channels x pixel panels.
struct WorkRange {
    int64_t m_begin, m_end, n_begin, n_end;
};

// Split `tiles` units of `tile_size` rows (of `rows` in all) and `panels` units of `panel_size`
// columns, over a reduction of length `cg`, on a threads_m x threads_n grid. Among grids of equal
// balance, prefer the one that moves fewer bytes: each thread column reads all the weights of its
// panels, each thread row all the activations of its tiles.
std::vector<WorkRange> partition(int64_t tiles, int64_t tile_size, int64_t rows, int64_t panels, int64_t panel_size,
                                 int64_t cg, int threads) {
    struct Candidate {
        int tm, tn;
        double cost;
    };
    Candidate best{1, 1, 0.0};
    bool have_best = false;
    for (int tm = 1; tm <= threads; ++tm) {
        if (threads % tm != 0) continue;
        const int tn = threads / tm;
        if (tm > tiles || tn > panels) continue;
        const double rows_per_thread = static_cast<double>(ceil_div(tiles, tm) * tile_size);
        const double slowest = std::min<double>(rows_per_thread, static_cast<double>(rows)) *
                               static_cast<double>(ceil_div(panels, tn) * panel_size) * static_cast<double>(cg + 8);
        const double traffic = static_cast<double>(tn) * static_cast<double>(rows) * static_cast<double>(cg) +
                               static_cast<double>(tm) * static_cast<double>(panels * panel_size) * static_cast<double>(cg);
        const double cost = slowest + 0.25 * traffic;
        if (!have_best || cost < best.cost) best = {tm, tn, cost};
        have_best = true;
    }
    std::vector<WorkRange> ranges;
    for (int i = 0; i < best.tm; ++i) {
        for (int j = 0; j < best.tn; ++j) {
            ranges.push_back({tiles * i / best.tm, tiles * (i + 1) / best.tm, panels * j / best.tn,
                              panels * (j + 1) / best.tn});
        }
    }
    return ranges;
}

// Threads for a call of rows x k outputs over a reduction of cg: shared among concurrent calls,
// and one for small calls, where a fork-join would cost more than it saves.
int call_threads(int64_t rows, int64_t k, int64_t cg) {
    const double flops = 2.0 * static_cast<double>(rows) * static_cast<double>(k) * static_cast<double>(cg);
    if (flops < 4.0e5) return 1;
    const int threads = get_num_threads() / std::max(1, calls_in_flight.load(std::memory_order_relaxed));
    return region_threads(std::max(1, threads));
}

// Runs work(range) for every range: inline for one, else in one parallel region, with denormals
// flushed in every thread and streaming stores fenced.
template <class Work>
void run_ranges(const std::vector<WorkRange>& ranges, bool streaming, const Work& work) {
    const int teams = static_cast<int>(ranges.size());
    if (teams == 1) {
        DenormalsAreZero daz;
        work(ranges[0]);
        if (streaming) fence_streaming_stores();
        return;
    }
#pragma omp parallel num_threads(teams)
    {
        DenormalsAreZero daz;
        // A smaller team than asked for (nested or limited OpenMP) still covers every range.
        for (int r = omp_get_thread_num(); r < teams; r += omp_get_num_threads()) work(ranges[r]);
        if (streaming) fence_streaming_stores();
    }
}

// Outputs larger than 3/8 of the last-level cache are written with non-temporal stores: they skip
// reading every output line before overwriting it, and most of such an output would be evicted
// (by the input, the weights, other cores) before the next layer reads it anyway. Measured on a
// 32 MiB L3 (streaming against plain stores, 1 / 2 threads): 4x56x56x64->256 (12 MiB out)
// +12 % / +6 %, 8x56x56x24->144 (14 MiB) +51 % / 0 %, 16x56x56x24->144 (28 MiB) +69 % / +62 %;
// smaller outputs stay cached and lose: 2x112x112x16->96 (9 MiB) +6 % / -12 %,
// 4x56x56x24->144 (7 MiB) -16 % / -20 %.
bool streams_output(int64_t floats) {
    return floats * static_cast<int64_t>(sizeof(float)) >= detail::stream_store_min_bytes();
}

}  // namespace

// ---- packed weights -------------------------------------------------------------------------

struct PackedWeights::Impl {
    const kernels::IsaKernels* isa = nullptr;
    GemmKernel kernel;
    Layout layout = Layout::nhwc;
    int64_t k = 0, cg = 0, groups = 1;
    int64_t kg = 0;
    // NHWC: the weights are the kernel's packed right operand, NR output channels per panel with
    // their biases in front.
    int64_t panels_per_group = 0, panel_stride = 0;
    AlignedBuffer panels;
    // NCHW: the weights are the kernel's left operand, read in place as K rows of C/groups (a
    // contiguous copy), with one bias per row; the activations are packed per call instead.
    AlignedBuffer weight_rows, row_bias;

    int64_t panel_count() const { return groups * panels_per_group; }
    const float* panel(int64_t p) const { return panels.get() + p * panel_stride; }

    void run(const TensorView& x, const TensorView& out, const TensorView* residual, const ConvGeometry& geo,
             Activation act) const;
    void run_nchw(const TensorView& x, const TensorView& out, const TensorView* residual, const ConvGeometry& geo,
                  Activation act) const;
};

PackedWeights::PackedWeights(const float* weight, int64_t out_channels, int64_t in_channels_per_group,
                             int64_t row_stride, int64_t col_stride, const float* bias, int64_t groups, Layout layout)
    : impl_(std::make_unique<Impl>()) {
    if (groups < 1 || out_channels < 0 || in_channels_per_group < 0 || out_channels % groups != 0) {
        throw std::invalid_argument("PackedWeights: groups must be >= 1 and divide the output channels");
    }
    Impl& w = *impl_;
    w.isa = &detail::active_kernels();
    w.k = out_channels;
    w.cg = in_channels_per_group;
    w.groups = groups;
    w.kg = out_channels / groups;
    w.layout = layout;
    if (layout == Layout::nchw) {
        w.kernel = w.isa->main;  // its NR columns are pixels here
        const char* what = "weight (K x C/groups)";
        w.weight_rows = allocate_floats(checked_floats(checked_mul(w.k, w.cg, what), what), what);
        w.row_bias = allocate_floats(static_cast<size_t>(w.k), "bias");
        for (int64_t r = 0; r < w.k; ++r) {
            for (int64_t c = 0; c < w.cg; ++c) w.weight_rows[r * w.cg + c] = weight[r * row_stride + c * col_stride];
            w.row_bias[r] = bias != nullptr ? bias[r] : 0.0f;
        }
        return;
    }
    w.kernel = w.kg <= w.isa->narrow.nr ? w.isa->narrow : w.isa->main;
    const int64_t nr = w.kernel.nr;
    w.panels_per_group = ceil_div(w.kg, nr);
    const char* what = "weight (K x C/groups), packed";
    w.panel_stride = checked_mul(nr, 1 + w.cg, what);
    w.panels = allocate_floats(checked_floats(checked_mul(w.panel_count(), w.panel_stride, what), what), what);

    const int64_t panel_count = w.panel_count();
    const int pack_threads = region_threads(panel_count * w.panel_stride > (1 << 16) ? get_num_threads() : 1);
#pragma omp parallel for schedule(static) num_threads(pack_threads) if (pack_threads > 1)
    for (int64_t p = 0; p < panel_count; ++p) {
        const int64_t g = p / w.panels_per_group;
        const int64_t first = g * w.kg + (p % w.panels_per_group) * nr;
        const int64_t width = std::min<int64_t>(nr, (g + 1) * w.kg - first);
        float* dst = w.panels.get() + p * w.panel_stride;
        if (width < nr) std::memset(dst, 0, sizeof(float) * static_cast<size_t>(w.panel_stride));  // zero padding
        for (int64_t n = 0; n < width; ++n) dst[n] = bias != nullptr ? bias[first + n] : 0.0f;
        // Transposed in blocks of kPackBlock channels: each source line is read once and the
        // block of panel rows being written stays in L1 (rows of a large weight matrix lie a
        // multiple of 4 KiB apart, so walking down a column would thrash L1's sets).
        constexpr int64_t kPackBlock = 16;
        for (int64_t c0 = 0; c0 < w.cg; c0 += kPackBlock) {
            const int64_t c1 = std::min(w.cg, c0 + kPackBlock);
            for (int64_t n = 0; n < width; ++n) {
                const float* src = weight + (first + n) * row_stride;
                for (int64_t c = c0; c < c1; ++c) dst[nr * (1 + c) + n] = src[c * col_stride];
            }
        }
    }
}

PackedWeights::~PackedWeights() = default;

int64_t PackedWeights::out_channels() const { return impl_->k; }
int64_t PackedWeights::in_channels() const { return impl_->cg * impl_->groups; }
int64_t PackedWeights::groups() const { return impl_->groups; }
Layout PackedWeights::layout() const { return impl_->layout; }
const char* PackedWeights::isa() const { return impl_->isa->isa; }
const char* PackedWeights::kernel_name() const { return impl_->kernel.name; }

int64_t conv_output_size(int64_t in, int64_t pad, int64_t stride) {
    int64_t padded = 0;
    if (__builtin_mul_overflow(pad, 2, &padded) || __builtin_add_overflow(padded, in, &padded)) {
        throw std::length_error("conv1x1: the padded input extent is too large");
    }
    return padded > 0 ? (padded - 1) / stride + 1 : 0;
}

namespace {

// NHWC: the channel axis must be contiguous. NCHW: for out and residual (contiguous_spatial), the
// (H, W) plane must be; x is gathered, so any strides do.
void check_view(const TensorView& v, const char* name, Layout layout, bool contiguous_spatial) {
    for (int64_t d : v.shape) {
        if (d < 0) throw std::invalid_argument(std::string(name) + " has a negative extent");
    }
    const bool empty = v.shape[0] == 0 || v.shape[1] == 0 || v.shape[2] == 0 || v.shape[3] == 0;
    if (!empty) {
        const std::string what = std::string(name) + "'s element count";
        checked_mul(checked_mul(checked_mul(v.shape[0], v.shape[1], what.c_str()), v.shape[2], what.c_str()), v.shape[3],
                    what.c_str());
    }
    if (!empty && v.data == nullptr) throw std::invalid_argument(std::string(name) + " has no data");
    if (layout == Layout::nhwc && !empty && v.shape[3] > 1 && v.strides[3] != 1) {
        throw std::invalid_argument(std::string(name) + " must have a contiguous channel axis (strides[3] == 1)");
    }
    if (layout == Layout::nchw && contiguous_spatial && !empty &&
        ((v.shape[3] > 1 && v.strides[3] != 1) || (v.shape[2] > 1 && v.strides[2] != v.shape[3]))) {
        throw std::invalid_argument(std::string(name) + " must have contiguous (H, W) planes");
    }
}

}  // namespace

std::array<int64_t, 4> PackedWeights::output_shape(const TensorView& x, const ConvGeometry& geometry) const {
    if (impl_->layout == Layout::nchw) {
        return {x.shape[0], out_channels(), conv_output_size(x.shape[2], geometry.pad_h, geometry.stride_h),
                conv_output_size(x.shape[3], geometry.pad_w, geometry.stride_w)};
    }
    return {x.shape[0], conv_output_size(x.shape[1], geometry.pad_h, geometry.stride_h),
            conv_output_size(x.shape[2], geometry.pad_w, geometry.stride_w), out_channels()};
}

void PackedWeights::run(const TensorView& x, const TensorView& out, const TensorView* residual,
                        const ConvGeometry& geometry, Activation activation) const {
    if (geometry.stride_h < 1 || geometry.stride_w < 1 || geometry.pad_h < 0 || geometry.pad_w < 0) {
        throw std::invalid_argument("conv1x1: strides must be >= 1 and paddings >= 0");
    }
    const Layout layout = impl_->layout;
    check_view(x, "x", layout, false);
    check_view(out, "out", layout, true);
    if (x.shape[layout == Layout::nchw ? 1 : 3] != in_channels()) {
        throw std::invalid_argument("conv1x1: x has the wrong number of channels");
    }
    const std::array<int64_t, 4> shape = output_shape(x, geometry);
    for (int d = 0; d < 4; ++d) {
        if (out.shape[d] != shape[d]) throw std::invalid_argument("conv1x1: out has the wrong shape");
        if (residual != nullptr && residual->shape[d] != shape[d]) {
            throw std::invalid_argument("conv1x1: residual must have the output's shape");
        }
    }
    if (residual != nullptr) check_view(*residual, "residual", layout, true);
    if (layout == Layout::nchw) {
        impl_->run_nchw(x, out, residual, geometry, activation);
    } else {
        impl_->run(x, out, residual, geometry, activation);
    }
}

void conv1x1(const TensorView& x, const float* weight, const float* bias, const TensorView& out,
             const TensorView* residual, const ConvOptions& options) {
    const bool nchw = options.layout == Layout::nchw;
    const int64_t cg = options.groups > 0 ? x.shape[nchw ? 1 : 3] / options.groups : 0;
    const PackedWeights packed(weight, out.shape[nchw ? 1 : 3], cg, cg, 1, bias, options.groups, options.layout);
    packed.run(x, out, residual, options.geometry, options.activation);
}

void PackedWeights::Impl::run(const TensorView& x, const TensorView& out, const TensorView* residual,
                              const ConvGeometry& geo, Activation act) const {
    const int64_t batch = out.shape[0], ho = out.shape[1], wo = out.shape[2];
    const int64_t rows = batch * ho * wo;
    if (rows == 0 || k == 0) return;

    const int64_t mr = tile_rows(kernel, x, geo);
    const int64_t tiles = ceil_div(rows, mr);
    const int64_t panels_total = panel_count();
    const Blocking blk = choose_blocking(kernel, cg, panels_total, tiles);

    // Padding reads a row of zeros, so border pixels get bias, residual and activation only.
    const bool padded = geo.pad_h > 0 || geo.pad_w > 0;
    AlignedBuffer zeros;
    if (padded) {
        const size_t count = static_cast<size_t>(std::max<int64_t>(cg * groups, 1));
        zeros = allocate_floats(count, "the padding's row of zeros");
        std::memset(zeros.get(), 0, count * sizeof(float));
    }

    const RowWalker walker_template(x, out, residual, geo, zeros.get());
    const bool stream = streams_output(rows * k);

    CallGuard guard;
    // Threads split the output pixels row by row, not tile by tile: 49 pixels (a 7x7 layer) go
    // 25 + 24 rather than 28 + 21, at the price of one partial tile per thread.
    const std::vector<WorkRange> ranges =
        partition(rows, 1, rows, panels_total, kernel.nr, cg, call_threads(rows, k, cg));
    const int64_t mc_rows = blk.mc_tiles * mr;

    // Within an M block, rows are taken a band at a time: the band's activations (band x kc, a
    // quarter of L1) stay in L1 while every panel of the block passes over them, so each panel's
    // weights come from L2 once per band rather than once per tile. Deep reductions leave room for
    // one tile only. Measured on Zen 3 (AVX2, 6x16), against a band of one tile, geometric mean of 16
    // MobileNet/ResNet layers: +2.5 % at 1 thread, +6 % at 2; 112x112x16->96 +36 %, 14x14x64->384 +18 % / +37 %.
    const int64_t band_rows = std::clamp<int64_t>(
        detail::cache_sizes().l1d / 4 / (blk.kc * static_cast<int64_t>(sizeof(float))) / mr * mr, mr, kMaxBandRows / mr * mr);

    const auto work = [&](const WorkRange& range) {
        float* out_rows[kMaxBandRows];
        const float* res_rows[kMaxBandRows];
        const float* a_rows[kMaxBandRows];
        GemmTileArgs args{};

        RowWalker walker = walker_template;
        for (int64_t pb = range.n_begin; pb < range.n_end; pb += blk.nc_panels) {
            const int64_t pe = std::min(range.n_end, pb + blk.nc_panels);
            for (int64_t mb = range.m_begin; mb < range.m_end; mb += mc_rows) {
                const int64_t me = std::min(range.m_end, mb + mc_rows);
                for (int64_t kb = 0; kb < blk.k_blocks; ++kb) {
                    const int64_t k0 = begin_k_block(args, blk, kb, cg, act, stream);
                    walker.seek(mb);
                    const int64_t first_group = pb / panels_per_group, first_j = pb % panels_per_group;
                    for (int64_t band = mb; band < me; band += band_rows) {
                        const int64_t rows_in_band = std::min(band_rows, me - band);
                        walker.next(rows_in_band, first_group * cg + k0, a_rows, out_rows, res_rows);
                        int64_t group = first_group, j = first_j;
                        // Panels pb..pe-1, walked as (group, panel within group) without divisions.
                        for (int64_t p = pb; p < pe; ++p) {
                            const int64_t col = group * kg + j * kernel.nr;
                            args.nr = static_cast<size_t>(std::min<int64_t>(kernel.nr, (group + 1) * kg - col));
                            args.col = static_cast<size_t>(col);
                            args.bias = kb == 0 ? panel(p) : nullptr;
                            args.w = panel(p) + kernel.nr * (1 + k0);
                            for (int64_t row = 0; row < rows_in_band; row += mr) {
                                const int64_t rows_in_tile = std::min<int64_t>(mr, rows_in_band - row);
                                args.a = a_rows + row;
                                args.c = out_rows + row;
                                args.residual = kb == 0 && residual != nullptr ? res_rows + row : nullptr;
                                kernel.by_rows[rows_in_tile - 1](args);
                            }
                            if (++j == panels_per_group && p + 1 < pe) {
                                j = 0;
                                ++group;
                                for (int64_t m = 0; m < rows_in_band; ++m) a_rows[m] += cg;  // the next group's channels
                            }
                        }
                    }
                }
            }
        }
    };

    run_ranges(ranges, stream, work);
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
    const bool stream = streams_output(batch * k * pixels);

    CallGuard guard;
    // Tiles of output channels play the role of NHWC's pixel tiles, pixel panels that of weight panels.
    const std::vector<WorkRange> ranges =
        partition(channel_tiles, mr, k, pixel_panels, nr, cg, call_threads(batch * pixels, k, cg));

    const auto work = [&](const WorkRange& range) {
        std::vector<float> block(static_cast<size_t>(std::max<int64_t>(blk.kc, 1) * nr));
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
                    args.residual = kb == 0 && residual != nullptr ? res_rows : nullptr;
                    kernel.by_rows[count - 1](args);
                }
            }
        }
    };

    run_ranges(ranges, stream, work);
}

// ---- peak ----------------------------------------------------------------------------------

double measure_fma_peak_gflops(int threads, double seconds) {
    if (threads < 1) throw std::invalid_argument("measure_fma_peak_gflops: threads must be >= 1");
    threads = region_threads(threads);
    const kernels::IsaKernels& isa = detail::active_kernels();
    const size_t iterations = 1u << 16;
    double best = 0.0;
    volatile float sink = 0.0f;
    const double start = omp_get_wtime();
    do {
        const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            const float v = isa.fma_probe(iterations);
#pragma omp atomic
            sink += v;
        }
        const double elapsed = omp_get_wtime() - t0;
        best = std::max(best, 2.0 * isa.fma_per_iteration * static_cast<double>(iterations) * threads / elapsed / 1e9);
    } while (omp_get_wtime() - start < seconds);
    return best;
}

// ---- thread control -------------------------------------------------------------------------

bool single_threaded_after_fork() { return forked_after_threads.load(std::memory_order_relaxed); }

int get_num_threads() {
    if (single_threaded_after_fork()) return 1;
    const int omp_threads = std::max(1, omp_get_max_threads());
    const int scoped = scoped_threads;
    const int requested = scoped > 0 ? scoped : requested_threads.load(std::memory_order_relaxed);
    return requested > 0 ? std::min(requested, omp_threads) : omp_threads;
}

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: the number of threads must be >= 1");
    requested_threads.store(n, std::memory_order_relaxed);
}

int set_num_threads_for_this_thread(int n) {
    if (n < 0) throw std::invalid_argument("set_num_threads_for_this_thread: the number of threads must be >= 0");
    return std::exchange(scoped_threads, n);
}

}  // namespace pwcpu
