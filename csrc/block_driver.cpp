// The fused inverted residual block: the 1x1 and depthwise layers' own drivers, called on bands of
// rows so that the expanded tensor lives in a per-thread buffer that stays in L2. Threads take
// contiguous runs of output rows; inside a run, the expanded rows a band shares with the next
// (kh - stride of them) move to the top of the buffer instead of being computed again.
#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "dispatch.hpp"
#include "pwcpu/pwcpu.hpp"
#include "runtime/memory.hpp"
#include "runtime/rows.hpp"
#include "runtime/threads.hpp"

namespace pwcpu {

struct InvertedResidual::Impl {
    std::unique_ptr<PackedWeights> expand;  // null: no expansion, the depthwise layer reads x
    std::unique_ptr<DepthwiseWeights> depthwise;
    std::unique_ptr<PackedWeights> se_reduce, se_expand;  // null: no squeeze-excitation
    std::unique_ptr<PackedWeights> project;
    InvertedResidualWeights options;  // shapes, activations, geometry (weight pointers not kept)

    struct Bands {
        int64_t height;       // output rows per band
        int64_t buffer_rows;  // expanded rows a band reads
    };

    void run(const TensorView& x, const TensorView& out) const;
    void run_layers_in_turn(const TensorView& x, const TensorView& out) const;
    void filter_whole(const TensorView& x, const TensorView& mid) const;
    void run_with_excitation(const TensorView& x, const TensorView& out) const;
    Bands bands_for(int64_t w, int64_t ho, int64_t wo) const;
    class BandWalker;
};

InvertedResidual::InvertedResidual(const InvertedResidualWeights& w) : impl_(std::make_unique<Impl>()) {
    if (w.in_channels < 1 || w.hidden_channels < 1 || w.out_channels < 1 || w.kernel_h < 1 || w.kernel_w < 1) {
        throw std::invalid_argument("InvertedResidual: channel counts and the kernel must be >= 1");
    }
    if (w.depthwise_weight == nullptr || w.project_weight == nullptr) {
        throw std::invalid_argument("InvertedResidual: the depthwise and project weights are required");
    }
    if (w.expand_weight == nullptr && w.hidden_channels != w.in_channels) {
        throw std::invalid_argument("InvertedResidual: without an expansion the hidden channels are the input's");
    }
    if ((w.se_reduce_weight == nullptr) != (w.se_expand_weight == nullptr) ||
        (w.se_reduce_weight != nullptr && w.se_channels < 1)) {
        throw std::invalid_argument("InvertedResidual: squeeze-excitation needs both weights and se_channels >= 1");
    }
    const ConvGeometry& g = w.depthwise_geometry;
    if (g.stride_h < 1 || g.stride_w < 1 || g.pad_h < 0 || g.pad_w < 0) {
        throw std::invalid_argument("InvertedResidual: strides must be >= 1 and paddings >= 0");
    }
    if (w.residual && (g.stride_h != 1 || g.stride_w != 1 || w.in_channels != w.out_channels ||
                       2 * g.pad_h != w.kernel_h - 1 || 2 * g.pad_w != w.kernel_w - 1)) {
        throw std::invalid_argument("InvertedResidual: a residual needs stride 1, 'same' padding and out_channels == in_channels");
    }
    Impl& b = *impl_;
    b.options = w;
    const auto pack_1x1 = [&w](const float* weight, const float* bias, int64_t k, int64_t c) {
        return std::make_unique<PackedWeights>(weight, k, c, c, 1, bias, 1, Layout::nhwc, w.precision);
    };
    if (w.expand_weight != nullptr) b.expand = pack_1x1(w.expand_weight, w.expand_bias, w.hidden_channels, w.in_channels);
    b.depthwise = std::make_unique<DepthwiseWeights>(w.depthwise_weight, w.hidden_channels, w.kernel_h, w.kernel_w,
                                                     w.depthwise_bias);
    if (w.se_reduce_weight != nullptr) {
        b.se_reduce = pack_1x1(w.se_reduce_weight, w.se_reduce_bias, w.se_channels, w.hidden_channels);
        b.se_expand = pack_1x1(w.se_expand_weight, w.se_expand_bias, w.hidden_channels, w.se_channels);
    }
    b.project = pack_1x1(w.project_weight, w.project_bias, w.out_channels, w.hidden_channels);
}

InvertedResidual::~InvertedResidual() = default;

int64_t InvertedResidual::in_channels() const { return impl_->options.in_channels; }
int64_t InvertedResidual::out_channels() const { return impl_->options.out_channels; }
const char* InvertedResidual::isa() const { return impl_->depthwise->isa(); }

std::array<int64_t, 4> InvertedResidual::output_shape(const TensorView& x) const {
    std::array<int64_t, 4> shape = impl_->depthwise->output_shape(
        TensorView{nullptr, {x.shape[0], x.shape[1], x.shape[2], impl_->options.hidden_channels}, {0, 0, 0, 1}},
        impl_->options.depthwise_geometry);
    shape[3] = impl_->options.out_channels;
    return shape;
}

void InvertedResidual::run(const TensorView& x, const TensorView& out) const {
    runtime::check_view(x, "x", Layout::nhwc, false);
    runtime::check_view(out, "out", Layout::nhwc, true);
    if (x.shape[3] != in_channels()) throw std::invalid_argument("InvertedResidual: x has the wrong number of channels");
    const std::array<int64_t, 4> shape = output_shape(x);
    for (int d = 0; d < 4; ++d) {
        if (out.shape[d] != shape[d]) throw std::invalid_argument("InvertedResidual: out has the wrong shape");
    }
    impl_->run(x, out);
}


namespace {

// A whole (batch, h, w, c) tensor in `buffer`.
TensorView whole_tensor(runtime::AlignedBuffer& buffer, int64_t batch, int64_t h, int64_t w, int64_t c, const char* what) {
    const int64_t count = runtime::checked_mul(runtime::checked_mul(runtime::checked_mul(batch, h, what), w, what), c, what);
    buffer = runtime::scratch_floats(runtime::checked_floats(count, what), what);
    return TensorView{buffer.get(), {batch, h, w, c}, {h * w * c, w * c, c, 1}};
}

}  // namespace

// Expand (if any) and depthwise on whole tensors, each threaded on its own: the depthwise output to mid.
void InvertedResidual::Impl::filter_whole(const TensorView& x, const TensorView& mid) const {
    runtime::AlignedBuffer expanded;
    TensorView dw_in = x;
    if (expand != nullptr) {
        dw_in = whole_tensor(expanded, x.shape[0], x.shape[1], x.shape[2], options.hidden_channels,
                             "the block's expanded tensor");
        expand->run(x, dw_in, nullptr, ConvGeometry{}, options.expand_activation);
    }
    depthwise->run(dw_in, mid, nullptr, options.depthwise_geometry, options.depthwise_activation);
}

// The block as its layers called one after another on whole tensors, each threaded on its own.
void InvertedResidual::Impl::run_layers_in_turn(const TensorView& x, const TensorView& out) const {
    runtime::AlignedBuffer filtered;
    const TensorView mid = whole_tensor(filtered, out.shape[0], out.shape[1], out.shape[2], options.hidden_channels,
                                        "the block's depthwise output");
    filter_whole(x, mid);
    project->run(mid, out, options.residual ? &x : nullptr, ConvGeometry{}, options.project_activation);
}

// Output rows per band: a band's expanded rows, (band - 1) * stride + kh, and its depthwise output
// fill half of L2 at most.
InvertedResidual::Impl::Bands InvertedResidual::Impl::bands_for(int64_t w, int64_t ho, int64_t wo) const {
    const int64_t e = options.hidden_channels, kh = options.kernel_h, sh = options.depthwise_geometry.stride_h;
    const int64_t expanded_row = runtime::checked_mul(w, e, "InvertedResidual's expanded row");
    const int64_t dw_row = wo * e;
    const int64_t budget = detail::cache_sizes().l2 / 2 / static_cast<int64_t>(sizeof(float));
    int64_t band = 1;
    while (band < ho && (band * sh + kh) * expanded_row + (band + 1) * dw_row <= budget) ++band;
    return {band, (band - 1) * sh + kh};
}

namespace {

// Fusing into bands pays while re-reading `weights` floats for every band costs less than half the
// floats of whole tensors it keeps out of memory (`saved`). Small maps with wide layers (14x14 and
// 7x7 in MobileNetV2 and EfficientNet) have weights larger than their activations. Measured on Zen 3
// (AVX2), the plain block fused over layer by layer: 112x112 and 56x56 blocks 1.04-2.8x, 28x28
// 1.0-1.06x, 14x14 and 7x7 0.79-0.98x.
bool bands_pay(double bands, double weights, double saved) { return 2.0 * bands * weights <= saved; }

// sums[c] = sum over `pixels` contiguous pixels of rows[p * channels + c].
void channel_sums(const float* rows, int64_t pixels, int64_t channels, float* sums) {
    std::fill(sums, sums + channels, 0.0f);
    for (int64_t p = 0; p < pixels; ++p) {
        const float* pixel = rows + p * channels;
        for (int64_t c = 0; c < channels; ++c) sums[c] += pixel[c];
    }
}

void scale_channels(float* rows, int64_t pixels, int64_t channels, const float* scale) {
    for (int64_t p = 0; p < pixels; ++p) {
        float* pixel = rows + p * channels;
        for (int64_t c = 0; c < channels; ++c) pixel[c] *= scale[c];
    }
}

}  // namespace

// Expand and depthwise over output rows, a band at a time: the band's expanded rows live in the
// walker's buffer (the rows it shares with the next band are moved, not computed again); the
// depthwise output goes to target(n, oh0, rows), then consume(n, oh0, rows, that view) uses it.
// Rows given on from where the walker stopped, in the same image, reuse the expanded rows they
// share with the rows before; others (a new image, rows taken from another thread's range) start
// afresh. One walker per thread.
class InvertedResidual::Impl::BandWalker {
public:
    BandWalker(const Impl& block, const TensorView& x, int64_t ho, const Bands& bands)
        : block_(block), x_(x), ho_(ho), bands_(bands),
          expanded_(runtime::scratch_floats(
              runtime::checked_floats(
                  runtime::checked_mul(bands.buffer_rows, runtime::checked_mul(x.shape[2], block.options.hidden_channels,
                                                                               "expanded rows"), "expanded rows"),
                  "expanded rows"),
              "the block's expanded rows")) {}

    // Output rows [begin, end) (rows of images in order: n * ho + oh).
    template <class Target, class Consume>
    void walk(int64_t begin, int64_t end, const Target& target, const Consume& consume) {
        const InvertedResidualWeights& o = block_.options;
        const ConvGeometry& g = o.depthwise_geometry;
        const int64_t h = x_.shape[1], w = x_.shape[2], e = o.hidden_channels, kh = o.kernel_h, sh = g.stride_h;
        const int64_t expanded_row = w * e, ho = ho_;
        float* const expanded = expanded_.get();
        for (int64_t row = begin; row < end;) {
            const int64_t n = row / ho, image_end = std::min(end, (n + 1) * ho);
            if (row != next_row_ || row == n * ho) have_lo_ = have_hi_ = 0;  // no expanded rows to reuse
            for (int64_t oh0 = row - n * ho; oh0 < image_end - n * ho; oh0 += bands_.height) {
                const int64_t rows_out = std::min(bands_.height, image_end - n * ho - oh0);
                const int64_t need_lo = oh0 * sh - g.pad_h, need_hi = (oh0 + rows_out - 1) * sh - g.pad_h + kh;
                int64_t kept = 0;
                if (have_hi_ > need_lo && have_lo_ <= need_lo) {
                    kept = have_hi_ - need_lo;
                    std::memmove(expanded, expanded + (need_lo - have_lo_) * expanded_row,
                                 static_cast<size_t>(kept * expanded_row) * sizeof(float));
                }
                // Rows [need_lo + kept, need_hi): zeros outside the image (the depthwise padding), the
                // expansion inside.
                const int64_t first = need_lo + kept;
                const int64_t inside_lo = std::clamp<int64_t>(first, 0, h), inside_hi = std::clamp<int64_t>(need_hi, 0, h);
                float* base = expanded + kept * expanded_row;
                const auto zero_rows = [&](int64_t from, int64_t to) {
                    if (to > from) {
                        std::memset(base + (from - first) * expanded_row, 0,
                                    static_cast<size_t>((to - from) * expanded_row) * sizeof(float));
                    }
                };
                zero_rows(first, std::min(need_hi, std::max(first, inside_lo)));
                if (inside_hi > inside_lo) {
                    const TensorView dst = runtime::buffer_view(base + (inside_lo - first) * expanded_row, inside_hi - inside_lo, w, e);
                    block_.expand->run(runtime::rows_of(x_, n, inside_lo, inside_hi - inside_lo), dst, nullptr, ConvGeometry{},
                                       o.expand_activation);
                }
                zero_rows(std::max(first, inside_hi), need_hi);
                have_lo_ = need_lo;
                have_hi_ = need_hi;

                const TensorView dw_in = runtime::buffer_view(expanded, need_hi - need_lo, w, e);
                const TensorView dw_out = target(n, oh0, rows_out);
                block_.depthwise->run(dw_in, dw_out, nullptr, ConvGeometry{sh, g.stride_w, 0, g.pad_w}, o.depthwise_activation);
                consume(n, oh0, rows_out, dw_out);
            }
            row = image_end;
        }
        next_row_ = end;
    }

private:
    const Impl& block_;
    const TensorView& x_;
    int64_t ho_;
    Bands bands_;
    runtime::AlignedBuffer expanded_;
    int64_t next_row_ = -1, have_lo_ = 0, have_hi_ = 0;  // expanded rows [have_lo_, have_hi_) of the image
};

void InvertedResidual::Impl::run(const TensorView& x, const TensorView& out) const {
    const InvertedResidualWeights& o = options;
    const int64_t batch = out.shape[0], ho = out.shape[1], wo = out.shape[2];
    if (batch * ho * wo == 0) return;
    if (se_reduce != nullptr) {
        run_with_excitation(x, out);
        return;
    }
    const int64_t h = x.shape[1], w = x.shape[2], e = o.hidden_channels;
    if (expand == nullptr) {  // no wide tensor to keep in cache
        run_layers_in_turn(x, out);
        return;
    }
    // Each band reads both 1x1 layers' weights again and keeps the expanded and filtered tensors
    // out of memory.
    const Bands bands = bands_for(w, ho, wo);
    const double weights = static_cast<double>(o.in_channels + o.out_channels) * static_cast<double>(e);
    const double saved = static_cast<double>(batch) * static_cast<double>(h * w + ho * wo) * static_cast<double>(e);
    if (!bands_pay(static_cast<double>(batch * runtime::ceil_div(ho, bands.height)), weights, saved)) {
        run_layers_in_turn(x, out);
        return;
    }

    runtime::CallGuard guard;
    const double flops = 2.0 * static_cast<double>(batch * h * w) * static_cast<double>(e) *
                         static_cast<double>(o.in_channels + o.kernel_h * o.kernel_w + o.out_channels);
    const std::vector<runtime::WorkRange> ranges =
        runtime::partition(batch * ho, 1, batch * ho, 1, e, o.in_channels, runtime::call_threads(flops));
    // A thread's own rows go a band at a time; rows taken from another's range cost their band's
    // overlap with the rows before (kh - stride expanded rows) again.
    runtime::run_rows_balanced(ranges, bands.height, [&] {
        // Each thread's worker: its buffers and walker stay for the call.
        struct Worker {
            Worker(const Impl& b, const TensorView& x_in, const TensorView& y, int64_t image_rows, int64_t y_w,
                   const Bands& bands_of)
                : block(b), x(x_in), out(y), wo(y_w),
                  filtered(runtime::scratch_floats(
                      runtime::checked_floats(runtime::checked_mul(bands_of.height, y_w * b.options.hidden_channels,
                                                                   "depthwise rows"), "depthwise rows"),
                      "the block's depthwise rows")),
                  walker(b, x_in, image_rows, bands_of) {}
            void operator()(int64_t begin, int64_t end) {
                const InvertedResidualWeights& o = block.options;
                const int64_t e = o.hidden_channels;
                const auto band_buffer = [&](int64_t, int64_t, int64_t rows) {
                    return runtime::buffer_view(filtered.get(), rows, wo, e);
                };
                const auto project_band = [&](int64_t n, int64_t oh0, int64_t rows, const TensorView& dw_out) {
                    TensorView identity;
                    if (o.residual) identity = runtime::rows_of(x, n, oh0, rows);  // stride 1, "same": x's rows align with out's
                    block.project->run(dw_out, runtime::rows_of(out, n, oh0, rows), o.residual ? &identity : nullptr,
                                       ConvGeometry{}, o.project_activation);
                };
                walker.walk(begin, end, band_buffer, project_band);
            }

            const Impl& block;
            const TensorView& x;
            const TensorView& out;
            int64_t wo;
            runtime::ThreadsForThisThread one{1};
            runtime::AlignedBuffer filtered;
            BandWalker walker;
        };
        return Worker(*this, x, out, ho, wo, bands);
    });
}

// With squeeze-excitation the scale needs the whole depthwise output first: (1) the depthwise
// output, whole, with each output row's channel sums taken while the row is in cache (expand and
// depthwise fused in bands where that pays); (2) per image, the means (rows summed in order, so the
// result does not depend on the thread count) through the two small 1x1 layers; (3) the depthwise
// output scaled and projected, band by band where re-reading the project weights costs less than a
// separate pass over the tensor.
void InvertedResidual::Impl::run_with_excitation(const TensorView& x, const TensorView& out) const {
    const InvertedResidualWeights& o = options;
    const int64_t batch = out.shape[0], ho = out.shape[1], wo = out.shape[2], e = o.hidden_channels;
    const int64_t h = x.shape[1], w = x.shape[2], rows = batch * ho;
    const char* what = "the block's depthwise output";
    runtime::AlignedBuffer filtered;
    const TensorView mid = whole_tensor(filtered, batch, ho, wo, e, what);
    runtime::AlignedBuffer row_sums = runtime::scratch_floats(runtime::checked_floats(rows * e, what), what);
    const auto sum_rows = [&](int64_t n, int64_t oh0, int64_t count, const TensorView& band) {
        for (int64_t r = 0; r < count; ++r) {
            channel_sums(band.data + r * wo * e, wo, e, row_sums.get() + (n * ho + oh0 + r) * e);
        }
    };
    const double e_flops = 2.0 * static_cast<double>(e);

    // (1) The depthwise output and its row sums.
    const Bands bands = expand != nullptr ? bands_for(w, ho, wo) : Bands{ho, 0};
    const double expanded_floats = static_cast<double>(batch) * static_cast<double>(h * w) * static_cast<double>(e);
    if (expand != nullptr && bands_pay(static_cast<double>(batch * runtime::ceil_div(ho, bands.height)),
                                       static_cast<double>(o.in_channels) * static_cast<double>(e), expanded_floats)) {
        runtime::CallGuard guard;
        const double flops = e_flops * static_cast<double>(batch * h * w) *
                             static_cast<double>(o.in_channels + o.kernel_h * o.kernel_w);
        const std::vector<runtime::WorkRange> ranges =
            runtime::partition(rows, 1, rows, 1, e, o.in_channels, runtime::call_threads(flops));
        const auto rows_of_mid = [&](int64_t n, int64_t oh0, int64_t count) { return runtime::rows_of(mid, n, oh0, count); };
        runtime::run_rows_balanced(ranges, bands.height, [&] {
            return [&, walker = BandWalker(*this, x, ho, bands)](int64_t begin, int64_t end) mutable {
                runtime::ThreadsForThisThread one(1);
                walker.walk(begin, end, rows_of_mid, sum_rows);
            };
        });
    } else {
        filter_whole(x, mid);
        runtime::CallGuard guard;
        const std::vector<runtime::WorkRange> ranges =
            runtime::partition(rows, 1, rows, 1, e, 1, runtime::call_threads(static_cast<double>(rows * wo * e)));
        runtime::run_ranges(ranges, false, [&](const runtime::WorkRange& range) {
            for (int64_t r = range.m_begin; r < range.m_end; ++r) sum_rows(r / ho, r % ho, 1, runtime::rows_of(mid, r / ho, r % ho, 1));
        });
    }

    // (2) Per image: channel means -> reduce + activation -> expand + gate = the scale.
    runtime::AlignedBuffer means = runtime::scratch_floats(runtime::checked_floats(batch * e, what), what);
    for (int64_t n = 0; n < batch; ++n) {
        for (int64_t c = 0; c < e; ++c) {
            double sum = 0.0;
            for (int64_t r = 0; r < ho; ++r) sum += row_sums.get()[(n * ho + r) * e + c];
            means.get()[n * e + c] = static_cast<float>(sum / static_cast<double>(ho * wo));
        }
    }
    runtime::AlignedBuffer squeezed = runtime::scratch_floats(runtime::checked_floats(batch * o.se_channels, what), what);
    runtime::AlignedBuffer scale = runtime::scratch_floats(runtime::checked_floats(batch * e, what), what);
    se_reduce->run(runtime::buffer_view(means.get(), 1, batch, e), runtime::buffer_view(squeezed.get(), 1, batch, o.se_channels),
                   nullptr, ConvGeometry{}, o.se_activation);
    se_expand->run(runtime::buffer_view(squeezed.get(), 1, batch, o.se_channels), runtime::buffer_view(scale.get(), 1, batch, e),
                   nullptr, ConvGeometry{}, o.se_gate);

    // (3) Scale and project.
    const auto scale_and_project = [&](int64_t n, int64_t oh0, int64_t count) {
        const TensorView band = runtime::rows_of(mid, n, oh0, count);
        scale_channels(band.data, count * wo, e, scale.get() + n * e);
        TensorView identity;
        if (o.residual) identity = runtime::rows_of(x, n, oh0, count);
        project->run(band, runtime::rows_of(out, n, oh0, count), o.residual ? &identity : nullptr, ConvGeometry{},
                     o.project_activation);
    };
    const int64_t budget = detail::cache_sizes().l2 / 4 / static_cast<int64_t>(sizeof(float));
    const int64_t band = std::max<int64_t>(1, std::min(ho, budget / std::max<int64_t>(1, wo * e)));
    const double mid_floats = static_cast<double>(rows * wo) * static_cast<double>(e);
    if (!bands_pay(static_cast<double>(batch * runtime::ceil_div(ho, band)), static_cast<double>(o.out_channels * e),
                   mid_floats)) {
        for (int64_t n = 0; n < batch; ++n) scale_channels(mid.data + n * ho * wo * e, ho * wo, e, scale.get() + n * e);
        project->run(mid, out, o.residual ? &x : nullptr, ConvGeometry{}, o.project_activation);
        return;
    }
    runtime::CallGuard guard;
    const std::vector<runtime::WorkRange> ranges = runtime::partition(
        rows, 1, rows, 1, o.out_channels, e, runtime::call_threads(e_flops * static_cast<double>(rows * wo * o.out_channels)));
    runtime::run_rows_balanced(ranges, band, [&] {
        return [&](int64_t begin, int64_t end) {
            runtime::ThreadsForThisThread one(1);
            for (int64_t r = begin; r < end;) {
                const int64_t n = r / ho, count = std::min({band, end - r, (n + 1) * ho - r});
                scale_and_project(n, r - n * ho, count);
                r += count;
            }
        };
    });
}

}  // namespace pwcpu
