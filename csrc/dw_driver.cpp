// The depthwise-convolution driver: weight packing, the tap pointers that carry stride and
// padding, and the split of output rows among threads. Threads, buffers and view checks come from
// runtime/, shared with the GEMM driver.
#include <algorithm>
#include <cstdlib>
#include <array>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.hpp"
#include "pwcpu/pwcpu.hpp"
#include "runtime/memory.hpp"
#include "runtime/rows.hpp"
#include "runtime/threads.hpp"

namespace pwcpu {

using runtime::AlignedBuffer;
using runtime::checked_floats;
using runtime::checked_mul;

struct DepthwiseWeights::Impl {
    const kernels::IsaKernels* isa = nullptr;
    kernels::DwKernel kernel;
    int64_t c = 0, kh = 0, kw = 0;
    AlignedBuffer packed;  // per block of channel_block channels: biases, then kh * kw rows of weights

    void run(const TensorView& x, const TensorView& out, const TensorView* residual, const ConvGeometry& geo,
             Activation act) const;
};

DepthwiseWeights::DepthwiseWeights(const float* weight, int64_t channels, int64_t kernel_h, int64_t kernel_w,
                                   const float* bias)
    : impl_(std::make_unique<Impl>()) {
    if (channels < 0 || kernel_h < 1 || kernel_w < 1) {
        throw std::invalid_argument("DepthwiseWeights: channels must be >= 0 and the kernel at least 1x1");
    }
    Impl& w = *impl_;
    w.isa = &detail::active_kernels();
    w.kernel = w.isa->depthwise;
    w.c = channels;
    w.kh = kernel_h;
    w.kw = kernel_w;
    const char* what = "depthwise weight (C x kh x kw), packed";
    const int64_t taps = checked_mul(kernel_h, kernel_w, what);
    const int64_t block = w.kernel.channel_block;
    const int64_t blocks = runtime::ceil_div(channels, block);
    int64_t taps_and_bias = 0;
    if (__builtin_add_overflow(taps, 1, &taps_and_bias)) throw std::length_error(std::string(what) + " is too large to describe");
    const int64_t block_floats = checked_mul(block, taps_and_bias, what);
    const size_t count = checked_floats(checked_mul(std::max<int64_t>(blocks, 1), block_floats, what), what);
    w.packed = runtime::allocate_floats(count, what);
    std::memset(w.packed.get(), 0, count * sizeof(float));  // padding channels stay zero
    for (int64_t ch = 0; ch < channels; ++ch) {
        float* dst = w.packed.get() + (ch / block) * block_floats + ch % block;
        dst[0] = bias != nullptr ? bias[ch] : 0.0f;
        for (int64_t t = 0; t < taps; ++t) dst[(1 + t) * block] = weight[ch * taps + t];
    }
}

DepthwiseWeights::~DepthwiseWeights() = default;

int64_t DepthwiseWeights::channels() const { return impl_->c; }
int64_t DepthwiseWeights::kernel_h() const { return impl_->kh; }
int64_t DepthwiseWeights::kernel_w() const { return impl_->kw; }
const char* DepthwiseWeights::isa() const { return impl_->isa->isa; }
const char* DepthwiseWeights::kernel_name() const { return impl_->kernel.name; }

std::array<int64_t, 4> DepthwiseWeights::output_shape(const TensorView& x, const ConvGeometry& geometry) const {
    return {x.shape[0], conv_output_size(x.shape[1], geometry.pad_h, geometry.stride_h, impl_->kh),
            conv_output_size(x.shape[2], geometry.pad_w, geometry.stride_w, impl_->kw), impl_->c};
}

void DepthwiseWeights::run(const TensorView& x, const TensorView& out, const TensorView* residual,
                           const ConvGeometry& geometry, Activation activation) const {
    runtime::check_conv_inputs("depthwise_conv2d", x, out, geometry, Layout::nhwc, channels());
    runtime::check_conv_outputs("depthwise_conv2d", out, residual, output_shape(x, geometry), Layout::nhwc);
    impl_->run(x, out, residual, geometry, activation);
}

void DepthwiseWeights::Impl::run(const TensorView& x, const TensorView& out, const TensorView* residual,
                                 const ConvGeometry& geo, Activation act) const {
    const int64_t ho = out.shape[1], wo = out.shape[2];
    const int64_t rows = out.shape[0] * ho;
    if (rows == 0 || wo == 0 || c == 0) return;
    const int64_t taps = kh * kw;

    // Interior output columns, whose taps all fall inside the input row: [first_inside, end_inside).
    const int64_t first_inside = std::min(wo, runtime::ceil_div(geo.pad_w, geo.stride_w));
    const int64_t last_start = x.shape[2] + geo.pad_w - kw;  // the last input column a window may start at, + pw
    const int64_t end_inside = last_start < 0 ? 0 : std::clamp(last_start / geo.stride_w + 1, first_inside, wo);

    // Small maps with wide filters (7x7 with 5x5): most of a row's pixels are border pixels, whose
    // taps cross the padding and which go one at a time (a weight load per multiply-add, twice a
    // run's). Where their taps outnumber four times the pixels of a zero-padded copy of the input,
    // the input is copied into one first, and every pixel of a row runs in one run. Measured on
    // Zen 3 (AVX2, 1 thread): 7x7x1152 5x5/1 110 -> 102 us; 14x14x672 5x5/2 (taps 1.1 times the
    // copy) 62 -> 81 us, hence the margin.
    const int64_t border_taps = (wo - (end_inside - first_inside)) * ho * out.shape[0] * taps;
    const int64_t padded_pixels = x.shape[0] * (x.shape[1] + 2 * geo.pad_h) * (x.shape[2] + 2 * geo.pad_w);
    if ((geo.pad_h > 0 || geo.pad_w > 0) && border_taps >= 4 * padded_pixels) {
        const int64_t batch = x.shape[0], h = x.shape[1], w = x.shape[2];
        const int64_t hp = h + 2 * geo.pad_h, wp = w + 2 * geo.pad_w;
        const char* what = "the zero-padded input";
        AlignedBuffer padded = runtime::scratch_floats(
            checked_floats(checked_mul(checked_mul(checked_mul(batch, hp, what), wp, what), c, what), what), what);
        const TensorView padded_x{padded.get(), {batch, hp, wp, c}, {hp * wp * c, wp * c, c, 1}};
        const int64_t padded_rows = batch * hp;
        const int copy_threads = runtime::region_threads(padded_rows * wp * c > (1 << 15) ? get_num_threads() : 1);
#pragma omp parallel for schedule(static) num_threads(copy_threads) if (copy_threads > 1)
        for (int64_t r = 0; r < padded_rows; ++r) {
            const int64_t n = r / hp, ih = r % hp - geo.pad_h;
            float* dst = padded.get() + r * wp * c;
            if (ih < 0 || ih >= h) {
                std::memset(dst, 0, static_cast<size_t>(wp * c) * sizeof(float));
                continue;
            }
            std::memset(dst, 0, static_cast<size_t>(geo.pad_w * c) * sizeof(float));
            const float* src = x.data + n * x.strides[0] + ih * x.strides[1];
            for (int64_t iw = 0; iw < w; ++iw) {
                std::memcpy(dst + (geo.pad_w + iw) * c, src + iw * x.strides[2], static_cast<size_t>(c) * sizeof(float));
            }
            std::memset(dst + (geo.pad_w + w) * c, 0, static_cast<size_t>(geo.pad_w * c) * sizeof(float));
        }
        run(padded_x, out, residual, ConvGeometry{geo.stride_h, geo.stride_w, 0, 0}, act);
        return;
    }

    // Taps that fall in the padding read a row of zeros laid out as an input row (pixels
    // x.strides[2] apart, with room for the padding on both sides): a run of pixels whose taps
    // cross the top or bottom padding reads it as it would read a real row.
    AlignedBuffer zeros;
    const float* zero_row = nullptr;  // where input column 0 of the zero row would be
    if (geo.pad_h > 0 || geo.pad_w > 0) {
        const char* what = "the padding's row of zeros";
        const int64_t step = std::abs(x.strides[2]);  // a view may run backwards (or broadcast: 0)
        const int64_t columns = runtime::checked_mul(x.shape[2] + 2 * geo.pad_w + kw, step, what);
        const size_t count = runtime::checked_floats(columns + c, what);
        zeros = runtime::scratch_floats(count, what);
        std::memset(zeros.get(), 0, count * sizeof(float));
        zero_row = zeros.get() + (x.strides[2] >= 0 ? geo.pad_w : x.shape[2] + geo.pad_w + kw) * step;
    }

    runtime::CallGuard guard;
    // Threads take whole output rows (an output row's pixels share input rows).
    const double flops = 2.0 * static_cast<double>(rows * wo) * static_cast<double>(c) * static_cast<double>(taps);
    const std::vector<runtime::WorkRange> ranges =
        runtime::partition(rows, 1, rows, 1, c, taps, runtime::call_threads(flops));

    // Each thread's worker: output rows [begin, end), its pointers to their taps kept between calls.
    const auto make_worker = [&] {
        return [&, taps_of = std::vector<const float*>(static_cast<size_t>(taps))](int64_t begin, int64_t end) mutable {
            kernels::DwRowArgs args{};
            args.channels = static_cast<size_t>(c);
            args.taps = static_cast<size_t>(taps);
            args.input = taps_of.data();
            args.input_step = geo.stride_w * x.strides[2];
            args.tap_step = x.strides[2];
            args.stride_w = static_cast<int>(std::min<int64_t>(geo.stride_w, 1 << 20));
            args.w = packed.get();
            args.out_step = out.strides[2];
            args.residual_step = residual != nullptr ? residual->strides[2] : 0;
            args.act = act;
            // Output pixels [ow0, ow0 + count) of row (n, oh): one run for the columns whose taps lie
            // inside the input horizontally (taps above or below it read the row of zeros), else pixel
            // by pixel.
            const auto compute = [&](int64_t n, int64_t oh, int64_t ow0, int64_t count, bool inside) {
                const float* x_image = x.data + n * x.strides[0];
                for (int64_t p = 0; p < count; p += inside ? count : 1) {
                    const int64_t ow = ow0 + p;
                    for (int64_t i = 0; i < kh; ++i) {
                        const int64_t ih = oh * geo.stride_h - geo.pad_h + i;
                        for (int64_t j = 0; j < kw; ++j) {
                            const int64_t iw = ow * geo.stride_w - geo.pad_w + j;
                            const bool tap_inside = ih >= 0 && ih < x.shape[1] && iw >= 0 && iw < x.shape[2];
                            taps_of[i * kw + j] = (tap_inside ? x_image + ih * x.strides[1] : zero_row) + iw * x.strides[2];
                        }
                    }
                    args.pixels = static_cast<size_t>(inside ? count : 1);
                    // A run's taps are its filter's rows of columns tap_step apart (the row of zeros is
                    // laid out as an input row); a border pixel's are whatever its window holds.
                    args.kernel_w = inside ? static_cast<int>(kw) : 0;
                    args.out = out.data + n * out.strides[0] + oh * out.strides[1] + ow * out.strides[2];
                    args.residual = residual != nullptr
                                        ? residual->data + n * residual->strides[0] + oh * residual->strides[1] + ow * residual->strides[2]
                                        : nullptr;
                    kernel.row(args);
                }
            };
            for (int64_t row = begin; row < end; ++row) {
                const int64_t n = row / ho, oh = row % ho;
                compute(n, oh, 0, first_inside, false);
                if (end_inside > first_inside) compute(n, oh, first_inside, end_inside - first_inside, true);
                compute(n, oh, end_inside, wo - end_inside, false);
            }
        };
    };
    // A thread's rows are claimed in about 8 parts (see run_rows_balanced).
    runtime::run_rows_balanced(ranges, std::max<int64_t>(1, runtime::ceil_div(rows, 8 * static_cast<int64_t>(ranges.size()))),
                               make_worker);
}

}  // namespace pwcpu
