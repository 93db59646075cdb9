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
    std::unique_ptr<PackedWeights> project;
    InvertedResidualWeights options;  // shapes, activations, geometry (weight pointers not kept)

    void run(const TensorView& x, const TensorView& out) const;
    void run_layers_in_turn(const TensorView& x, const TensorView& out) const;
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
    if (w.expand_weight != nullptr) {
        b.expand = std::make_unique<PackedWeights>(w.expand_weight, w.hidden_channels, w.in_channels, w.in_channels, 1,
                                                   w.expand_bias, 1);
    }
    b.depthwise = std::make_unique<DepthwiseWeights>(w.depthwise_weight, w.hidden_channels, w.kernel_h, w.kernel_w,
                                                     w.depthwise_bias);
    b.project = std::make_unique<PackedWeights>(w.project_weight, w.out_channels, w.hidden_channels, w.hidden_channels, 1,
                                                w.project_bias, 1);
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

// The calling thread's count for the duration of a scope: the layers called inside a worker run on
// that worker alone.
struct ThreadsForThisThread {
    int saved;
    explicit ThreadsForThisThread(int n) : saved(set_num_threads_for_this_thread(n)) {}
    ~ThreadsForThisThread() { set_num_threads_for_this_thread(saved); }
};

}  // namespace

// The block as its layers called one after another on whole tensors, each threaded on its own.
void InvertedResidual::Impl::run_layers_in_turn(const TensorView& x, const TensorView& out) const {
    const InvertedResidualWeights& o = options;
    const int64_t batch = out.shape[0], ho = out.shape[1], wo = out.shape[2], e = o.hidden_channels;
    const auto whole_tensor = [&](runtime::AlignedBuffer& buffer, int64_t h, int64_t w, const char* what) {
        const int64_t count = runtime::checked_mul(runtime::checked_mul(batch * h, w, what), e, what);
        buffer = runtime::allocate_floats(runtime::checked_floats(count, what), what);
        return TensorView{buffer.get(), {batch, h, w, e}, {h * w * e, w * e, e, 1}};
    };
    runtime::AlignedBuffer expanded, filtered;
    TensorView dw_in = x;
    if (expand != nullptr) {
        dw_in = whole_tensor(expanded, x.shape[1], x.shape[2], "the block's expanded tensor");
        expand->run(x, dw_in, nullptr, ConvGeometry{}, o.expand_activation);
    }
    const TensorView mid = whole_tensor(filtered, ho, wo, "the block's depthwise output");
    depthwise->run(dw_in, mid, nullptr, o.depthwise_geometry, o.depthwise_activation);
    project->run(mid, out, o.residual ? &x : nullptr, ConvGeometry{}, o.project_activation);
}

void InvertedResidual::Impl::run(const TensorView& x, const TensorView& out) const {
    const InvertedResidualWeights& o = options;
    const int64_t batch = out.shape[0], ho = out.shape[1], wo = out.shape[2];
    if (batch * ho * wo == 0) return;
    const int64_t h = x.shape[1], w = x.shape[2], e = o.hidden_channels, kh = o.kernel_h;
    const ConvGeometry& g = o.depthwise_geometry;
    const int64_t sh = g.stride_h;
    if (expand == nullptr) {  // no wide tensor to keep in cache
        run_layers_in_turn(x, out);
        return;
    }

    // Band height: the expanded rows of a band, (band - 1) * stride + kh, and its depthwise output
    // fill half of L2 at most.
    const int64_t expanded_row = runtime::checked_mul(w, e, "InvertedResidual's expanded row");
    const int64_t dw_row = wo * e;
    const int64_t budget = detail::cache_sizes().l2 / 2 / static_cast<int64_t>(sizeof(float));
    int64_t band = 1;
    while (band < ho && ((band) * sh + kh) * expanded_row + (band + 1) * dw_row <= budget) ++band;
    const int64_t buffer_rows = (band - 1) * sh + kh;

    // Each band reads both 1x1 layers' weights again; fusing pays while that costs less than half
    // the expanded and filtered tensors it keeps out of memory. Small maps with wide layers (14x14
    // and 7x7 in MobileNetV2 and EfficientNet) have weights larger than their activations and run
    // the layers in turn, each threaded on its own. Measured on Zen 3 (AVX2), fused over layer by
    // layer: 112x112 and 56x56 blocks 1.04-2.8x, 28x28 1.0-1.06x, 14x14 and 7x7 0.79-0.98x.
    const double weights = static_cast<double>(o.in_channels + o.out_channels) * static_cast<double>(e);
    const double bands = static_cast<double>(batch * runtime::ceil_div(ho, band));
    const double saved = static_cast<double>(batch) * static_cast<double>(h * w + ho * wo) * static_cast<double>(e);
    if (2.0 * bands * weights > saved) {
        run_layers_in_turn(x, out);
        return;
    }

    runtime::CallGuard guard;
    const double flops = 2.0 * static_cast<double>(batch * h * w) * static_cast<double>(e) *
                         static_cast<double>(o.in_channels + kh * o.kernel_w + o.out_channels);
    const std::vector<runtime::WorkRange> ranges =
        runtime::partition(batch * ho, 1, batch * ho, 1, e, o.in_channels, runtime::call_threads(flops));

    const auto work = [&](const runtime::WorkRange& range) {
        ThreadsForThisThread one(1);
        runtime::AlignedBuffer expanded = runtime::allocate_floats(
            runtime::checked_floats(runtime::checked_mul(buffer_rows, expanded_row, "expanded rows"), "expanded rows"),
            "the block's expanded rows");
        runtime::AlignedBuffer filtered = runtime::allocate_floats(
            runtime::checked_floats(runtime::checked_mul(band, dw_row, "depthwise rows"), "depthwise rows"),
            "the block's depthwise rows");
        for (int64_t row = range.m_begin; row < range.m_end;) {
            const int64_t n = row / ho, image_end = std::min(range.m_end, (n + 1) * ho);
            // Expanded input rows held in `expanded`: [have_lo, have_hi), none at the start of an image run.
            int64_t have_lo = 0, have_hi = 0;
            for (int64_t oh0 = row - n * ho; oh0 < image_end - n * ho; oh0 += band) {
                const int64_t rows_out = std::min(band, image_end - n * ho - oh0);
                const int64_t need_lo = oh0 * sh - g.pad_h, need_hi = (oh0 + rows_out - 1) * sh - g.pad_h + kh;
                int64_t kept = 0;
                if (have_hi > need_lo && have_lo <= need_lo) {
                    kept = have_hi - need_lo;
                    std::memmove(expanded.get(), expanded.get() + (need_lo - have_lo) * expanded_row,
                                 static_cast<size_t>(kept * expanded_row) * sizeof(float));
                }
                // Rows [need_lo + kept, need_hi): zeros outside the image (the depthwise padding),
                // the expansion inside.
                const int64_t first = need_lo + kept;
                const int64_t inside_lo = std::clamp<int64_t>(first, 0, h), inside_hi = std::clamp<int64_t>(need_hi, 0, h);
                float* base = expanded.get() + kept * expanded_row;
                const auto zero_rows = [&](int64_t from, int64_t to) {
                    if (to > from) {
                        std::memset(base + (from - first) * expanded_row, 0, static_cast<size_t>((to - from) * expanded_row) * sizeof(float));
                    }
                };
                zero_rows(first, std::min(need_hi, std::max(first, inside_lo)));
                if (inside_hi > inside_lo) {
                    const TensorView dst = runtime::buffer_view(base + (inside_lo - first) * expanded_row, inside_hi - inside_lo, w, e);
                    const TensorView src = runtime::rows_of(x, n, inside_lo, inside_hi - inside_lo);
                    expand->run(src, dst, nullptr, ConvGeometry{}, o.expand_activation);
                }
                zero_rows(std::max(first, inside_hi), need_hi);
                have_lo = need_lo;
                have_hi = need_hi;

                const TensorView dw_in = runtime::buffer_view(expanded.get(), need_hi - need_lo, w, e);
                const TensorView dw_out = runtime::buffer_view(filtered.get(), rows_out, wo, e);
                depthwise->run(dw_in, dw_out, nullptr, ConvGeometry{sh, g.stride_w, 0, g.pad_w}, o.depthwise_activation);
                TensorView identity;
                if (o.residual) identity = runtime::rows_of(x, n, oh0, rows_out);  // stride 1, "same": x's rows align with out's
                project->run(dw_out, runtime::rows_of(out, n, oh0, rows_out), o.residual ? &identity : nullptr, ConvGeometry{},
                             o.project_activation);
            }
            row = image_end;
        }
    };
    runtime::run_ranges(ranges, false, work);
}

}  // namespace pwcpu
