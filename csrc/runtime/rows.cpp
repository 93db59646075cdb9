// Checks shared by every operator's views, and the copy that makes any view one they read in place.
#include "runtime/rows.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "runtime/memory.hpp"
#include "runtime/threads.hpp"

namespace pwcpu::runtime {

void check_view(const ViewShape& v, const char* name, Layout layout, bool contiguous_spatial) {
    for (int d = 0; d < 4; ++d) {
        if (v.shape[d] < 0) throw std::invalid_argument(std::string(name) + " has a negative extent");
    }
    const bool empty = v.shape[0] == 0 || v.shape[1] == 0 || v.shape[2] == 0 || v.shape[3] == 0;
    if (!empty) {
        const std::string what = std::string(name) + "'s element count";
        checked_mul(checked_mul(checked_mul(v.shape[0], v.shape[1], what.c_str()), v.shape[2], what.c_str()), v.shape[3],
                    what.c_str());
    }
    if (!empty && !v.has_data) throw std::invalid_argument(std::string(name) + " has no data");
    if (layout == Layout::nhwc && !empty && v.shape[3] > 1 && v.strides[3] != 1) {
        throw std::invalid_argument(std::string(name) + " must have a contiguous channel axis (strides[3] == 1)");
    }
    if (layout == Layout::nchw && contiguous_spatial && !empty &&
        ((v.shape[3] > 1 && v.strides[3] != 1) || (v.shape[2] > 1 && v.strides[2] != v.shape[3]))) {
        throw std::invalid_argument(std::string(name) + " must have contiguous (H, W) planes");
    }
}

void check_conv_inputs(const char* op, const ViewShape& x, const ViewShape& out, const ConvGeometry& geometry,
                       Layout layout, int64_t channels) {
    if (geometry.stride_h < 1 || geometry.stride_w < 1 || geometry.pad_h < 0 || geometry.pad_w < 0) {
        throw std::invalid_argument(std::string(op) + ": strides must be >= 1 and paddings >= 0");
    }
    check_view(x, "x", layout, false);
    check_view(out, "out", layout, true);
    if (x.shape[layout == Layout::nchw ? 1 : 3] != channels) {
        throw std::invalid_argument(std::string(op) + ": x has the wrong number of channels");
    }
}

void check_conv_outputs(const char* op, const ViewShape& out, const ViewShape* residual,
                        const std::array<int64_t, 4>& shape, Layout layout) {
    for (int d = 0; d < 4; ++d) {
        if (out.shape[d] != shape[d]) throw std::invalid_argument(std::string(op) + ": out has the wrong shape");
        if (residual != nullptr && residual->shape[d] != shape[d]) {
            throw std::invalid_argument(std::string(op) + ": residual must have the output's shape");
        }
    }
    if (residual != nullptr) check_view(*residual, "residual", layout, true);
}

}  // namespace pwcpu::runtime

namespace pwcpu {

int64_t conv_output_size(int64_t in, int64_t pad, int64_t stride, int64_t kernel) {
    int64_t padded = 0;
    if (__builtin_mul_overflow(pad, 2, &padded) || __builtin_add_overflow(padded, in, &padded)) {
        throw std::length_error("convolution: the padded input extent is too large");
    }
    return padded >= kernel && kernel >= 1 ? (padded - kernel) / stride + 1 : 0;
}

namespace {

// Pixels [0, w) of C channel planes plane_step apart (a row of an NCHW image) interleaved into
// NHWC: at a fixed channel count the compiler interleaves whole vectors (a stem's 3 channels).
template <int C>
void interleave_planes(const float* __restrict row, int64_t plane_step, float* __restrict to, int64_t w) {
    for (int64_t p = 0; p < w; ++p) {
        for (int ch = 0; ch < C; ++ch) to[p * C + ch] = row[ch * plane_step + p];
    }
}

}  // namespace

void copy_to_nhwc(const TensorView& src, float* dst) {
    const int64_t h = src.shape[1], w = src.shape[2], c = src.shape[3], rows = src.shape[0] * h;
    if (rows == 0 || w == 0 || c == 0) return;
    const int64_t row_floats = w * c;
    // A channel at a time over a piece of the row: each channel's run is read along its plane, and
    // the piece's output (16 KiB at most, beyond 8 pixels) stays in L1 while its channels arrive.
    const int64_t piece = std::max<int64_t>(8, 4096 / c);
    const int threads = runtime::region_threads(rows * row_floats > (1 << 16) ? get_num_threads() : 1);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = src.data + (r / h) * src.strides[0] + (r % h) * src.strides[1];
        float* to = dst + r * row_floats;
        if (src.strides[2] == 1 && c <= 4) {
            switch (c) {
                case 1: interleave_planes<1>(row, src.strides[3], to, w); continue;
                case 2: interleave_planes<2>(row, src.strides[3], to, w); continue;
                case 3: interleave_planes<3>(row, src.strides[3], to, w); continue;
                default: interleave_planes<4>(row, src.strides[3], to, w); continue;
            }
        }
        for (int64_t p0 = 0; p0 < w; p0 += piece) {
            const int64_t p1 = std::min(w, p0 + piece);
            for (int64_t ch = 0; ch < c; ++ch) {
                const float* from = row + ch * src.strides[3];
                for (int64_t p = p0; p < p1; ++p) to[p * c + ch] = from[p * src.strides[2]];
            }
        }
    }
}

}  // namespace pwcpu
