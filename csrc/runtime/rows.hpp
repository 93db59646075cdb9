// NHWC pixel rows: where an operator's tiles read and write, and the checks every view passes.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include "pwcpu/pwcpu.hpp"

namespace pwcpu::runtime {

// Maps output pixels, in (n, oh, ow) order, to the rows a tile reads and writes: the input row
// (or a row of zeros where the pixel falls in the padding), the output row and the residual row.
// The first pixel's position costs divisions, the rest are increments. T: float, uint8_t for 8-bit
// quantized tensors, or uint16_t for bfloat16 inputs (their bits); TOut: the output's and residual's.
template <class T, class TOut = T>
class BasicRowWalker {
public:
    using View = BasicTensorView<T>;
    using OutView = BasicTensorView<TOut>;
    BasicRowWalker(const View& x, const OutView& out, const OutView* residual, const ConvGeometry& geo, const T* zeros)
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
    void next(int64_t count, int64_t channel, const T** x_rows, TOut** out_rows, const TOut** res_rows) {
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
            TOut* const out = line_.out + ow_ * os2_;
            for (int64_t i = 0; i < run; ++i) out_rows[m + i] = out + i * os2_;
            if (res_ != nullptr) {
                const TOut* const res = line_.res + ow_ * rs2_;
                for (int64_t i = 0; i < run; ++i) res_rows[m + i] = res + i * rs2_;
            }
            const int64_t iw0 = ow_ * sw_ - pw_, iw_last = iw0 + (run - 1) * sw_;
            if (line_.x != nullptr && iw0 >= 0 && iw_last < w_) {
                const T* const x = line_.x + iw0 * xs2_ + channel;
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
        const T* x;  // null: the whole output row lies in the vertical padding
        TOut* out;
        const TOut* res;
    };

    Line line_at(int64_t n, int64_t oh) const {
        const int64_t ih = oh * sh_ - ph_;
        return {ih >= 0 && ih < h_ ? x_ + n * xs0_ + ih * xs1_ : nullptr, out_ + n * os0_ + oh * os1_,
                res_ != nullptr ? res_ + n * rs0_ + oh * rs1_ : nullptr};
    }

    const T* x_;
    TOut* out_;
    const TOut* res_;
    const T* zeros_;
    int64_t h_, w_, ho_, wo_;
    int64_t xs0_, xs1_, xs2_, os0_, os1_, os2_, rs0_, rs1_, rs2_;
    int64_t sh_, sw_, ph_, pw_;
    int64_t n_ = 0, oh_ = 0, ow_ = 0;
    Line line_{};
};

using RowWalker = BasicRowWalker<float>;

// A view's shape and strides, whatever its element type: what the checks below look at.
struct ViewShape {
    bool has_data;
    const int64_t* shape;
    const int64_t* strides;
    template <class T>
    ViewShape(const BasicTensorView<T>& v) : has_data(v.data != nullptr), shape(v.shape), strides(v.strides) {}  // NOLINT
};

// NHWC: the channel axis must be contiguous. NCHW: for out and residual (contiguous_spatial), the
// (H, W) plane must be; x is gathered, so any strides do. Throws std::invalid_argument naming `name`.
void check_view(const ViewShape& v, const char* name, Layout layout, bool contiguous_spatial);

// What every convolution checks before computing, in two steps around its output shape (which
// needs a valid x): the geometry, x's and out's views and x's channel count; then out's and the
// residual's shapes and the residual's view (null: none). Throws std::invalid_argument starting with `op`.
void check_conv_inputs(const char* op, const ViewShape& x, const ViewShape& out, const ConvGeometry& geometry,
                       Layout layout, int64_t channels);
void check_conv_outputs(const char* op, const ViewShape& out, const ViewShape* residual,
                        const std::array<int64_t, 4>& shape, Layout layout);
template <class T>
void check_conv_outputs(const char* op, const BasicTensorView<T>& out, const BasicTensorView<T>* residual,
                        const std::array<int64_t, 4>& shape, Layout layout) {
    if (residual == nullptr) return check_conv_outputs(op, ViewShape(out), nullptr, shape, layout);
    const ViewShape residual_shape(*residual);
    check_conv_outputs(op, ViewShape(out), &residual_shape, shape, layout);
}

// Rows [first, first + count) of image n of an NHWC view, as a one-image view.
inline TensorView rows_of(const TensorView& v, int64_t n, int64_t first, int64_t count) {
    TensorView r = v;
    r.data = v.data + n * v.strides[0] + first * v.strides[1];
    r.shape[0] = 1;
    r.shape[1] = count;
    return r;
}

// A contiguous (rows, width, channels) buffer as a one-image view.
inline TensorView buffer_view(float* data, int64_t rows, int64_t width, int64_t channels) {
    return TensorView{data, {1, rows, width, channels}, {rows * width * channels, width * channels, channels, 1}};
}

}  // namespace pwcpu::runtime
