// The dense-convolution driver: im2col rows (each output pixel's kh x kw x C input window, zeros
// in the padding) built a band at a time and handed to the GEMM driver as a 1x1 convolution. With
// groups, a row holds each group's window in turn, and the GEMM runs its grouped 1x1 convolution.
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

using runtime::checked_floats;
using runtime::checked_mul;

namespace {

// Plain loops rather than memcpy/memset: im2col copies runs of a few floats (a stem's 3 channels)
// where a library call costs more than the copy.
inline void copy_floats(float* __restrict dst, const float* __restrict src, int64_t count) {
    for (int64_t q = 0; q < count; ++q) dst[q] = src[q];
}

inline void fill_zeros(float* dst, int64_t count) {
    for (int64_t q = 0; q < count; ++q) dst[q] = 0.0f;
}

// `count` runs of `run` floats, src and dst advancing by their steps: one tap row of the windows
// of consecutive pixels (a window's row is contiguous in x). The stems' short runs (kw x C of 3x3,
// 5x5 and 7x7 windows on 1 or 3 channels) are compiled at a fixed length: straight-line copies
// instead of a loop whose set-up costs as much as the few floats it moves.
// (A memcpy of a constant length is expanded in place; GCC turned the loop it replaced into a call
// to memmove per run, 9 % of a 7x7 stem's time.)
template <int64_t Run>
void copy_fixed_runs(float* __restrict dst, int64_t dst_step, const float* __restrict src, int64_t src_step,
                     int64_t count) {
    for (int64_t r = 0; r < count; ++r, dst += dst_step, src += src_step) std::memcpy(dst, src, Run * sizeof(float));
}

void copy_runs(float* dst, int64_t dst_step, const float* src, int64_t src_step, int64_t count, int64_t run) {
    switch (run) {
        case 3: return copy_fixed_runs<3>(dst, dst_step, src, src_step, count);
        case 5: return copy_fixed_runs<5>(dst, dst_step, src, src_step, count);
        case 7: return copy_fixed_runs<7>(dst, dst_step, src, src_step, count);
        case 9: return copy_fixed_runs<9>(dst, dst_step, src, src_step, count);
        case 15: return copy_fixed_runs<15>(dst, dst_step, src, src_step, count);
        case 21: return copy_fixed_runs<21>(dst, dst_step, src, src_step, count);
        default:
            for (int64_t r = 0; r < count; ++r) copy_floats(dst + r * dst_step, src + r * src_step, run);
    }
}

}  // namespace

struct DenseConvWeights::Impl {
    int64_t k = 0, c = 0, kh = 0, kw = 0, groups = 1;
    std::unique_ptr<PackedWeights> gemm;  // K x (kh kw C / groups) per group, the window's taps outermost

    void run(const TensorView& x, const TensorView& out, const TensorView* residual, const ConvGeometry& geo,
             Activation act) const;
};

DenseConvWeights::DenseConvWeights(const float* weight, int64_t out_channels, int64_t in_channels, int64_t kernel_h,
                                   int64_t kernel_w, const float* bias, int64_t groups)
    : impl_(std::make_unique<Impl>()) {
    if (out_channels < 0 || in_channels < 0 || kernel_h < 1 || kernel_w < 1) {
        throw std::invalid_argument("DenseConvWeights: channels must be >= 0 and the kernel at least 1x1");
    }
    if (groups < 1 || in_channels % groups != 0 || out_channels % groups != 0) {
        throw std::invalid_argument("DenseConvWeights: groups must be >= 1 and divide both channel counts");
    }
    Impl& w = *impl_;
    w.k = out_channels;
    w.c = in_channels;
    w.kh = kernel_h;
    w.kw = kernel_w;
    w.groups = groups;
    const char* what = "dense convolution weight (K x C/groups x kh x kw)";
    const int64_t taps = checked_mul(kernel_h, kernel_w, what);
    const int64_t cg = in_channels / groups;
    const int64_t patch = checked_mul(taps, cg, what);
    // Reordered so that a row of the GEMM's weights matches a group's part of an im2col row: tap
    // (i, j), then channel.
    std::vector<float> rows(checked_floats(checked_mul(out_channels, patch, what), what));
    for (int64_t o = 0; o < out_channels; ++o) {
        for (int64_t ch = 0; ch < cg; ++ch) {
            for (int64_t t = 0; t < taps; ++t) rows[o * patch + t * cg + ch] = weight[(o * cg + ch) * taps + t];
        }
    }
    w.gemm = std::make_unique<PackedWeights>(rows.data(), out_channels, patch, patch, 1, bias, groups);
}

DenseConvWeights::~DenseConvWeights() = default;

int64_t DenseConvWeights::out_channels() const { return impl_->k; }
int64_t DenseConvWeights::in_channels() const { return impl_->c; }
int64_t DenseConvWeights::kernel_h() const { return impl_->kh; }
int64_t DenseConvWeights::kernel_w() const { return impl_->kw; }
int64_t DenseConvWeights::groups() const { return impl_->groups; }
const char* DenseConvWeights::isa() const { return impl_->gemm->isa(); }
const char* DenseConvWeights::kernel_name() const { return impl_->gemm->kernel_name(); }

std::array<int64_t, 4> DenseConvWeights::output_shape(const TensorView& x, const ConvGeometry& geometry) const {
    return {x.shape[0], conv_output_size(x.shape[1], geometry.pad_h, geometry.stride_h, impl_->kh),
            conv_output_size(x.shape[2], geometry.pad_w, geometry.stride_w, impl_->kw), impl_->k};
}

void DenseConvWeights::run(const TensorView& x, const TensorView& out, const TensorView* residual,
                           const ConvGeometry& geometry, Activation activation) const {
    runtime::check_conv_inputs("conv2d", x, out, geometry, Layout::nhwc, in_channels());
    runtime::check_conv_outputs("conv2d", out, residual, output_shape(x, geometry), Layout::nhwc);
    impl_->run(x, out, residual, geometry, activation);
}

void DenseConvWeights::Impl::run(const TensorView& x, const TensorView& out, const TensorView* residual,
                                 const ConvGeometry& geo, Activation act) const {
    const int64_t batch = out.shape[0], ho = out.shape[1], wo = out.shape[2];
    if (batch * ho * wo == 0 || k == 0) return;
    const int64_t h = x.shape[1], w = x.shape[2], taps = kh * kw, cg = c / groups, patch = taps * c;
    const int64_t row_floats = checked_mul(wo, patch, "conv2d's im2col row");
    // One group: a window's row of kw pixels is one run of kw * C floats in x and in the im2col row.
    const bool rows_contiguous = groups == 1 && x.strides[2] == c;

    // Band height: its im2col rows fill half of L2, and more where the weights are larger, so that
    // reading them again for every band costs at most half as much as the band's own rows.
    const int64_t weight_floats = checked_mul(k, taps * cg, "conv2d's weights");
    const int64_t half_l2 = detail::cache_sizes().l2 / 2 / static_cast<int64_t>(sizeof(float));
    const int64_t band = std::clamp<int64_t>(std::max(half_l2, 2 * weight_floats) / std::max<int64_t>(row_floats, 1), 1, ho);
    const auto columns_buffer = [&] {
        return runtime::scratch_floats(
            checked_floats(checked_mul(band, row_floats, "conv2d's im2col band"), "conv2d's im2col band"),
            "conv2d's im2col rows");
    };

    // Output pixels [interior_lo, interior_hi) of a row have their windows inside the image
    // horizontally; with one group and contiguous pixels, each tap row of theirs is copied as runs.
    const int64_t interior_lo = std::min(wo, runtime::ceil_div(geo.pad_w, geo.stride_w));
    const int64_t interior_hi =
        w + geo.pad_w >= kw ? std::clamp<int64_t>((w + geo.pad_w - kw) / geo.stride_w + 1, interior_lo, wo) : interior_lo;
    // Output pixel ow of row oh of image n: its window, zeros in the padding, to dst.
    const auto fill_pixel = [&](const float* image, int64_t oh, int64_t ow, float* dst) {
        const int64_t iw0 = ow * geo.stride_w - geo.pad_w;
        for (int64_t i = 0; i < kh; ++i) {
            const int64_t ih = oh * geo.stride_h - geo.pad_h + i;
            const bool row_inside = ih >= 0 && ih < h;
            const float* row = row_inside ? image + ih * x.strides[1] : nullptr;
            for (int64_t j = 0; j < kw; ++j) {
                const int64_t iw = iw0 + j;
                const bool inside = row_inside && iw >= 0 && iw < w;
                // Group g's channels of tap (i, j) go to its part of the row.
                for (int64_t g = 0; g < groups; ++g) {
                    float* to = dst + g * taps * cg + (i * kw + j) * cg;
                    if (inside) {
                        copy_floats(to, row + iw * x.strides[2] + g * cg, cg);
                    } else {
                        fill_zeros(to, cg);
                    }
                }
            }
        }
    };
    // Output row oh of image n's im2col rows, to dst.
    const bool interior_runs = rows_contiguous && interior_hi > interior_lo;
    const auto fill_row = [&](int64_t n, int64_t oh, float* dst) {
        const float* image = x.data + n * x.strides[0];
        for (int64_t ow = 0; ow < wo; ++ow) {
            if (interior_runs && ow == interior_lo) {
                ow = interior_hi - 1;
                continue;
            }
            fill_pixel(image, oh, ow, dst + ow * patch);
        }
        if (!interior_runs) return;
        const int64_t count = interior_hi - interior_lo, run = kw * c;
        for (int64_t i = 0; i < kh; ++i) {
            const int64_t ih = oh * geo.stride_h - geo.pad_h + i;
            float* to = dst + interior_lo * patch + i * run;
            if (ih >= 0 && ih < h) {
                const float* from = image + ih * x.strides[1] + (interior_lo * geo.stride_w - geo.pad_w) * c;
                copy_runs(to, patch, from, geo.stride_w * c, count, run);
            } else {
                for (int64_t r = 0; r < count; ++r) fill_zeros(to + r * patch, run);
            }
        }
    };
    const auto multiply = [&](int64_t n, int64_t oh0, int64_t rows, float* columns) {
        TensorView res_rows;
        if (residual != nullptr) res_rows = runtime::rows_of(*residual, n, oh0, rows);
        gemm->run(runtime::buffer_view(columns, rows, wo, patch), runtime::rows_of(out, n, oh0, rows),
                  residual != nullptr ? &res_rows : nullptr, ConvGeometry{}, act);
    };

    // Weights that stay in cache beside a band (stems, shallow layers): each thread builds and
    // multiplies the bands of its own output rows, so a band is read by the core that filled it and
    // no fork-join separates filling from multiplying. Larger weights: one band at a time, its rows
    // filled by all threads and the GEMM splitting the weights among them.
    const int64_t pixel_rows = batch * ho;
    const int threads = runtime::call_threads(2.0 * static_cast<double>(pixel_rows * wo) *
                                              static_cast<double>(weight_floats));
    if (threads > 1 && weight_floats <= half_l2 && pixel_rows >= 2 * threads) {
        runtime::CallGuard guard;
        const std::vector<runtime::WorkRange> ranges =
            runtime::partition(pixel_rows, 1, pixel_rows, 1, k, patch, threads);
        // Threads claim a band of rows at a time, their own first (see run_rows_balanced).
        runtime::run_rows_balanced(ranges, band, [&] {
            return [&, columns = columns_buffer()](int64_t begin, int64_t end) {
                runtime::ThreadsForThisThread one(1);
                for (int64_t row = begin; row < end;) {
                    const int64_t n = row / ho, oh0 = row - n * ho;
                    const int64_t rows = std::min({band, end - row, ho - oh0});
                    for (int64_t r = 0; r < rows; ++r) fill_row(n, oh0 + r, columns.get() + r * row_floats);
                    multiply(n, oh0, rows, columns.get());
                    row += rows;
                }
            };
        });
        return;
    }
    runtime::AlignedBuffer columns = columns_buffer();
    for (int64_t n = 0; n < batch; ++n) {
        for (int64_t oh0 = 0; oh0 < ho; oh0 += band) {
            const int64_t rows = std::min(band, ho - oh0);
            const int fill_threads = runtime::region_threads(rows * row_floats > (1 << 15) ? threads : 1);
#pragma omp parallel for schedule(static) num_threads(fill_threads) if (fill_threads > 1)
            for (int64_t r = 0; r < rows; ++r) fill_row(n, oh0 + r, columns.get() + r * row_floats);
            multiply(n, oh0, rows, columns.get());
        }
    }
}

}  // namespace pwcpu
