// Checks shared by every operator's views.
#include "runtime/rows.hpp"

#include <stdexcept>
#include <string>

#include "runtime/memory.hpp"

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

}  // namespace pwcpu
