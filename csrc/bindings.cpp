// pybind11 bindings over pwcpu.hpp. The Python API (python/pwcpu) parses a layer's options and
// weights; the arrays of each call are validated here, in one pass that costs well under a
// microsecond on the common path, then the GIL is released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "pwcpu/pwcpu.hpp"

namespace py = pybind11;

namespace {

using pwcpu::TensorView;

// numpy's Python functions, for the slow paths (conversions, copies, exact overlap tests). Never
// destroyed: a static py::object would be released after the interpreter is gone.
py::module_& numpy() {
    static auto* np = new py::module_(py::module_::import("numpy"));
    return *np;
}

std::string text(const py::handle& h) { return py::repr(h).cast<std::string>(); }

py::tuple shape_tuple(const std::vector<py::ssize_t>& shape) {
    py::tuple t(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) t[i] = shape[i];
    return t;
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// An output whose byte size does not even fit in an address space cannot be allocated: say so
// before NumPy's stride arithmetic overflows.
void check_allocatable(const std::vector<py::ssize_t>& shape) {
    for (py::ssize_t extent : shape) {
        if (extent == 0) return;
    }
    py::ssize_t bytes = sizeof(float);
    for (py::ssize_t extent : shape) {
        if (__builtin_mul_overflow(bytes, extent, &bytes)) {
            PyErr_SetString(PyExc_MemoryError, ("an output of shape " + text(shape_tuple(shape)) +
                                                " is too large to allocate").c_str());
            throw py::error_already_set();
        }
    }
}

// A new output array from pwcpu's output buffers (pwcpu.hpp: cache-line aligned, so that rows of
// a multiple of 16 channels take whole-line non-temporal stores; huge pages; the last freed
// blocks reused, so that `y = layer(x)` in a loop does not fault in fresh pages on every call).
py::array aligned_output(const std::vector<py::ssize_t>& shape) {
    check_allocatable(shape);
    size_t bytes = sizeof(float);
    for (py::ssize_t extent : shape) bytes *= static_cast<size_t>(extent);
    struct Block {
        void* data;
        size_t bytes;
    };
    const std::string what = "an output of shape " + text(shape_tuple(shape));
    auto* block = new Block{pwcpu::allocate_buffer(bytes, pwcpu::BufferKind::output, what.c_str()), bytes};
    py::capsule owner(block, [](void* p) {
        auto* b = static_cast<Block*>(p);
        pwcpu::free_buffer(b->data, b->bytes, pwcpu::BufferKind::output);
        delete b;
    });
    return py::array_t<float>(shape, static_cast<float*>(block->data), owner);
}

bool is_native_float32(const py::array& a) { return a.dtype().equal(py::dtype::of<float>()); }

// A NumPy array of ml_dtypes' bfloat16, recognised by its dtype's name (ml_dtypes not imported).
bool is_bfloat16(const py::handle& value) {
    if (!py::isinstance<py::array>(value)) return false;
    const py::array a = py::reinterpret_borrow<py::array>(value);
    return a.itemsize() == 2 && a.dtype().kind() == 'V' && py::str(a.dtype().attr("name")).cast<std::string>() == "bfloat16";
}

// A bfloat16 array's bits: a uint16 view of the same memory.
py::array bits_of(const py::handle& bfloat16_array) {
    return bfloat16_array.attr("view")(py::dtype::of<uint16_t>());
}

bool is_masked(const py::handle& array) {
    static auto* ndarray = new py::object(numpy().attr("ndarray"));
    if (py::type::handle_of(array).is(*ndarray)) return false;  // the common case, without looking up numpy.ma
    static auto* masked = new py::object(py::module_::import("numpy.ma").attr("MaskedArray"));
    return py::isinstance(array, *masked);
}

// `value` as a float32 ndarray: array-likes are converted, other dtypes are a TypeError that says
// how to convert (no silent downcast).
py::array float32_array(const py::handle& value, const std::string& name) {
    if (value.is_none()) throw py::type_error(name + " must be a float32 array, not None");
    const bool is_array = py::isinstance<py::array>(value);
    if (is_array && is_masked(value)) {
        throw py::type_error(name + " is a masked array, and pwcpu would ignore its mask: pass " + name +
                             ".filled(value) to compute with the masked entries replaced, or np.asarray(" + name +
                             ") to use the data as it is");
    }
    py::array a = is_array ? py::reinterpret_borrow<py::array>(value) : py::array(numpy().attr("asarray")(value));
    if (!is_native_float32(a)) {
        const std::string how = is_array ? name + ".astype(np.float32)" : "np.asarray(" + name + ", dtype=np.float32)";
        throw py::type_error(name + " must be float32, got " + py::str(a.dtype()).cast<std::string>() +
                             "; pwcpu never downcasts silently, convert it with " + how);
    }
    return a;
}

bool float_aligned(const py::array& a) {
    if (reinterpret_cast<uintptr_t>(a.data()) % sizeof(float) != 0) return false;
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
        if (a.strides(d) % static_cast<py::ssize_t>(sizeof(float)) != 0) return false;
    }
    return true;
}

// Whether the kernels can use `a` in place: float-aligned and, for NHWC, a contiguous channel
// (last) axis; for NCHW, contiguous (H, W) planes, except for a gathered input (x), which may
// have any strides.
bool kernel_layout(const py::array& a, pwcpu::Layout layout, bool gathered = false) {
    if (a.size() == 0) return true;
    if (!float_aligned(a)) return false;
    const py::ssize_t last = a.ndim() - 1, item = sizeof(float);
    const bool rows = a.shape(last) <= 1 || a.strides(last) == item;
    if (layout == pwcpu::Layout::nhwc) return rows;
    return gathered || (rows && (a.shape(last - 1) <= 1 || a.strides(last - 1) == a.shape(last) * item));
}

// The NHWC view of an NCHW-shaped tensor's memory (a PyTorch tensor's data pointer, size and
// strides); false unless its channels are contiguous.
bool nhwc_of_nchw(uintptr_t data, const py::tuple& shape, const py::tuple& strides, TensorView& v) {
    constexpr int kAxis[4] = {0, 2, 3, 1};  // NHWC axis d is NCHW axis kAxis[d]
    v.data = reinterpret_cast<float*>(data);
    for (int d = 0; d < 4; ++d) {
        v.shape[d] = shape[kAxis[d]].cast<int64_t>();
        v.strides[d] = strides[kAxis[d]].cast<int64_t>();
    }
    return v.strides[3] == 1 || v.shape[3] <= 1;
}

// `view` copied into `copy` (a contiguous float32 array of its shape), as a view of the copy.
TensorView copy_nhwc(const TensorView& view, py::array& copy) {
    float* data = static_cast<float*>(copy.mutable_data());
    {
        py::gil_scoped_release no_gil;
        pwcpu::copy_to_nhwc(view, data);
    }
    TensorView contiguous = view;
    contiguous.data = data;
    contiguous.strides[3] = 1;
    for (int d = 2; d >= 0; --d) contiguous.strides[d] = contiguous.strides[d + 1] * view.shape[d + 1];
    return contiguous;
}

// `a`, or a contiguous copy where the kernels cannot read it in place. An NHWC image whose channels
// are strided (an NCHW array transposed) is copied by pwcpu, several times faster than NumPy's copy.
py::array readable(const py::array& a, pwcpu::Layout layout, bool gathered = false) {
    if (kernel_layout(a, layout, gathered)) return a;
    if (layout == pwcpu::Layout::nhwc && a.ndim() == 4 && float_aligned(a) && is_native_float32(a)) {
        TensorView view;
        view.data = static_cast<float*>(const_cast<void*>(a.data()));
        for (int d = 0; d < 4; ++d) {
            view.shape[d] = a.shape(d);
            view.strides[d] = a.strides(d) / static_cast<py::ssize_t>(sizeof(float));
        }
        py::array copy = aligned_output({a.shape(0), a.shape(1), a.shape(2), a.shape(3)});
        copy_nhwc(view, copy);
        return copy;
    }
    return py::array(numpy().attr("ascontiguousarray")(a));
}

// Byte range [lo, hi) that `a` touches; empty for a zero-size array.
std::pair<intptr_t, intptr_t> extent(const py::array& a) {
    if (a.size() == 0) return {0, 0};
    intptr_t lo = reinterpret_cast<intptr_t>(a.data()), hi = lo + a.itemsize();
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
        const intptr_t span = static_cast<intptr_t>((a.shape(d) - 1) * a.strides(d));
        (span < 0 ? lo : hi) += span;
    }
    return {lo, hi};
}

bool overlaps(const py::array& a, const py::array& b) {
    const auto [alo, ahi] = extent(a);
    const auto [blo, bhi] = extent(b);
    if (alo == ahi || blo == bhi || ahi <= blo || bhi <= alo) return false;  // the common case
    try {
        return numpy().attr("shares_memory")(a, b, py::arg("max_work") = 100000).cast<bool>();
    } catch (py::error_already_set& e) {
        if (e.matches(numpy().attr("exceptions").attr("TooHardError"))) return true;
        throw;
    }
}

// Whether two elements of `a` may share memory (a zero or overlapping stride). Sufficient test:
// sorted by stride, each axis must step past everything the smaller axes span.
bool overlaps_itself(const py::array& a) {
    if (a.size() <= 1) return false;
    constexpr int kMaxDims = 64;  // NumPy's limit: no allocation on the call path
    std::array<std::pair<py::ssize_t, py::ssize_t>, kMaxDims> axes;  // (|stride|, extent) of axes longer than 1
    int count = 0;
    for (py::ssize_t d = 0; d < a.ndim() && count < kMaxDims; ++d) {
        if (a.shape(d) > 1) axes[count++] = {std::abs(a.strides(d)), a.shape(d)};
    }
    std::sort(axes.begin(), axes.begin() + count);
    py::ssize_t span = a.itemsize();
    for (int i = 0; i < count; ++i) {
        if (axes[i].first < span) return true;
        span = axes[i].first * (axes[i].second - 1) + span;
    }
    return false;
}

bool same_view(const py::array& a, const py::array& b) {
    if (a.data() != b.data() || a.ndim() != b.ndim()) return false;
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
        if (a.shape(d) != b.shape(d) || a.strides(d) != b.strides(d)) return false;
    }
    return true;
}

// 4-D views of the arrays of one call (out, x and residual), each in its own axis order. Without
// merge_leading each array is 4-D. With it, the arrays are (..., C) with the same leading shape,
// and their leading axes are merged into at most three strided axes, jointly: an axis joins the
// one before it only where it does so in every array, so the views walk the same pixels in the
// same order. False when more than three axes remain.
bool tensor_views(const py::array* const* arrays, TensorView* const* views, int count, bool merge_leading) {
    constexpr int kMaxArrays = 3, kMaxAxes = 32;
    struct Axis {
        int64_t extent[kMaxArrays];
        int64_t stride[kMaxArrays];
    };
    const auto element_stride = [](const py::array& a, py::ssize_t d) {
        return static_cast<int64_t>(a.strides(d) / static_cast<py::ssize_t>(sizeof(float)));
    };
    const py::ssize_t last = arrays[0]->ndim() - 1;
    for (int i = 0; i < count; ++i) {
        views[i]->data = static_cast<float*>(const_cast<void*>(arrays[i]->data()));
        views[i]->shape[3] = arrays[i]->shape(last);
        views[i]->strides[3] = element_stride(*arrays[i], last);
    }
    Axis axes[kMaxAxes];
    int merged = 0;
    bool empty = false;
    for (py::ssize_t d = 0; d < last; ++d) {
        const int64_t n = arrays[0]->shape(d);  // the same in every array when merging
        empty = empty || n == 0;
        if (n == 1 && merge_leading) continue;
        bool joins = merge_leading && merged > 0;
        for (int i = 0; i < count && joins; ++i) {  // (the strides of an array with no elements never matter)
            joins = arrays[i]->size() == 0 || axes[merged - 1].stride[i] == element_stride(*arrays[i], d) * n;
        }
        if (!joins && merged == kMaxAxes) return false;
        Axis& axis = axes[joins ? merged - 1 : merged++];
        for (int i = 0; i < count; ++i) {
            axis.extent[i] = joins ? axis.extent[i] * n : arrays[i]->shape(d);
            axis.stride[i] = element_stride(*arrays[i], d);
        }
    }
    if (empty && merge_leading) {
        merged = 1;
        axes[0] = Axis{{0, 0, 0}, {0, 0, 0}};
    }
    if (merged > 3) return false;
    for (int d = 0; d < 3; ++d) {
        const int src = d - (3 - merged);
        for (int i = 0; i < count; ++i) {
            views[i]->shape[d] = src >= 0 ? axes[src].extent[i] : 1;
            views[i]->strides[d] = src >= 0 ? axes[src].stride[i] : 0;
        }
    }
    return true;
}

// A precision code from the Python API, checked.
pwcpu::Precision precision_of(int code) {
    if (code < static_cast<int>(pwcpu::Precision::fp32) || code > static_cast<int>(pwcpu::Precision::int8)) {
        throw py::value_error("invalid precision code");
    }
    return static_cast<pwcpu::Precision>(code);
}

// Packed weights plus the options of a layer: everything a call needs, checked once. A call
// validates its arrays here (TypeError / ValueError naming the argument), before any memory is
// written; an `out` the kernels cannot write in place is an error, never a hidden temporary.
// What every operator's plan shares: the checks of a call's arrays (x, residual, out), the output
// allocation, and the views handed to the core. A plan keeps its weights (and bias, when given)
// to refuse an out that overlaps them.
class OperatorPlan {
public:
    virtual ~OperatorPlan() = default;

    // The eager PyTorch path: an NCHW-shaped tensor's channels_last memory read in place (a plain
    // NCHW tensor's copied to NHWC first) and a contiguous NHWC output written, through raw
    // pointers (no NumPy views on the way). False, with nothing computed, when the residual's
    // channels are not contiguous.
    bool conv_channels_last(uintptr_t x_data, const py::tuple& x_shape, const py::tuple& x_strides, uintptr_t out_data,
                            uintptr_t residual_data, const py::object& residual_strides) {
        if (layout_ != pwcpu::Layout::nhwc) return false;
        TensorView xv, ov, rv;
        const bool x_in_place = nhwc_of_nchw(x_data, x_shape, x_strides, xv);
        if (xv.shape[3] != expected_in_channels()) throw py::value_error("x has the wrong number of channels");
        const std::array<int64_t, 4> shape = output_shape_of(xv);
        ov.data = reinterpret_cast<float*>(out_data);
        for (int d = 0; d < 4; ++d) ov.shape[d] = shape[d];
        ov.strides[3] = 1;
        for (int d = 2; d >= 0; --d) ov.strides[d] = ov.strides[d + 1] * shape[d + 1];
        if (residual_data != 0) {
            const py::tuple residual_shape = py::make_tuple(shape[0], shape[3], shape[1], shape[2]);
            if (!nhwc_of_nchw(residual_data, residual_shape, py::reinterpret_borrow<py::tuple>(residual_strides), rv)) {
                return false;
            }
        }
        py::array x_copy;  // a model's input is usually plain NCHW: its first layer reads this copy
        if (!x_in_place) {
            x_copy = aligned_output({xv.shape[0], xv.shape[1], xv.shape[2], xv.shape[3]});
            xv = copy_nhwc(xv, x_copy);
        }
        run(xv, ov, residual_data != 0 ? &rv : nullptr);
        return true;
    }

protected:
    OperatorPlan(py::array weight, py::object bias, bool weights_private, pwcpu::Layout layout)
        : weight_(std::move(weight)), bias_(std::move(bias)), weights_private_(weights_private), layout_(layout) {}

    // Computes into views that execute() has checked; the GIL is held on entry.
    virtual void run(const TensorView& x, const TensorView& out, const TensorView* residual) = 0;
    virtual void run_bfloat16(const pwcpu::BFloat16View&, const TensorView&, const TensorView*) {
        throw std::logic_error("this operator does not read bfloat16");
    }

    // The NHWC view of a 4-D array of bfloat16 bits (uint16) whose channels are contiguous (a
    // copy where they are not).
    static pwcpu::BFloat16View bfloat16_view(py::array& x) {
        const py::ssize_t item = sizeof(uint16_t);
        bool whole = x.shape(3) <= 1 || x.strides(3) == item;
        for (int d = 0; d < 4; ++d) whole = whole && x.strides(d) % item == 0;
        if (!whole) x = numpy().attr("ascontiguousarray")(x);
        pwcpu::BFloat16View v;
        v.data = const_cast<uint16_t*>(static_cast<const uint16_t*>(x.data()));  // read only
        for (int d = 0; d < 4; ++d) {
            v.shape[d] = x.shape(d);
            v.strides[d] = x.strides(d) / item;
        }
        return v;
    }
    // x's channel count, and the NHWC output shape for an NHWC x, for conv_channels_last.
    virtual int64_t expected_in_channels() const = 0;
    virtual std::array<int64_t, 4> output_shape_of(const TensorView& x) const = 0;

    void check_out(const py::object& out, const std::vector<py::ssize_t>& shape) const {
        if (!py::isinstance<py::array>(out)) {
            throw py::type_error("out must be a NumPy array, got " + py::str(py::type::of(out).attr("__name__")).cast<std::string>());
        }
        const py::array a = py::reinterpret_borrow<py::array>(out);
        if (!is_native_float32(a)) throw py::type_error("out must be float32, got " + py::str(a.dtype()).cast<std::string>());
        if (shape_of(a) != shape) {
            throw py::value_error("out must have shape " + text(shape_tuple(shape)) + ", got " + text(a.attr("shape")));
        }
        if (!a.writeable()) throw py::value_error("out must be writable");
        if (overlaps_itself(a)) {
            throw py::value_error("out must not overlap itself (its strides " + text(a.attr("strides")) +
                                  " make several elements share memory)");
        }
        if (!kernel_layout(a, layout_)) {
            throw py::value_error(std::string("out must have ") +
                                  (layout_ == pwcpu::Layout::nchw ? "contiguous (H, W) planes" : "a contiguous channel (last) axis") +
                                  ", be aligned and have float-sized strides; got strides " + text(a.attr("strides")));
        }
    }

    // x_bfloat16: x holds bfloat16 bits (uint16, 4-D NHWC), for run_bfloat16.
    py::array execute(const py::array& x, const py::object& residual_in, const py::object& out_in,
                      const std::vector<py::ssize_t>& shape, bool merge_leading, bool x_bfloat16 = false) {
        // (A default-constructed py::array is an empty array, not a null handle: keep a flag.)
        const bool has_residual = !residual_in.is_none();
        py::array residual;
        if (has_residual) {
            residual = float32_array(residual_in, "residual");
            if (shape_of(residual) != shape) {
                throw py::value_error("residual must have the output's shape " + text(shape_tuple(shape)) + ", got " +
                                      text(residual.attr("shape")));
            }
        }
        py::array out;
        if (out_in.is_none()) {
            out = aligned_output(shape);
        } else {
            check_out(out_in, shape);
            out = py::reinterpret_borrow<py::array>(out_in);
            if (overlaps(out, x)) throw py::value_error("out overlaps x in memory; use a separate output array");
            if (!weights_private_) {
                if (overlaps(out, weight_)) throw py::value_error("out overlaps weight in memory; use a separate output array");
                if (!bias_.is_none() && overlaps(out, py::array(bias_))) {
                    throw py::value_error("out overlaps bias in memory; use a separate output array");
                }
            }
            if (has_residual && !same_view(out, residual) && overlaps(out, residual)) {
                throw py::value_error("out may be the very array passed as residual, but must not partly overlap it");
            }
        }

        TensorView xv, ov, rv;
        py::array r_read = has_residual ? (same_view(out, residual) ? out : readable(residual, layout_)) : out;
        if (x_bfloat16) {
            const py::array* arrays[] = {&out, &r_read};
            TensorView* views[] = {&ov, &rv};
            if (!tensor_views(arrays, views, has_residual ? 2 : 1, false)) {
                throw py::value_error("out and residual must be 4-D views with float-sized strides");
            }
            py::array x_bits = x;  // (or its contiguous copy, kept alive here)
            run_bfloat16(bfloat16_view(x_bits), ov, has_residual ? &rv : nullptr);
            return out;
        }
        py::array x_read = readable(x, layout_, true);
        const py::array* arrays[] = {&out, &x_read, &r_read};
        TensorView* views[] = {&ov, &xv, &rv};
        const int count = has_residual ? 3 : 2;
        if (!tensor_views(arrays, views, count, merge_leading)) {
            // Inputs whose leading axes do not merge with out's: contiguous copies merge as out does.
            x_read = numpy().attr("ascontiguousarray")(x_read);
            if (has_residual && !same_view(out, residual)) r_read = numpy().attr("ascontiguousarray")(r_read);
            if (!tensor_views(arrays, views, count, merge_leading)) {
                throw py::value_error("out's leading axes (strides " + text(out.attr("strides")) +
                                      ") cannot be viewed as 3 strided axes; pass a C-contiguous out");
            }
        }
        run(xv, ov, has_residual ? &rv : nullptr);
        return out;
    }

    py::array weight_;
    py::object bias_;  // as given, for the overlap check
    bool weights_private_;
    pwcpu::Layout layout_;
};

class ConvPlan : public OperatorPlan {
public:
    ConvPlan(const py::array& weight, const py::object& bias, int64_t groups, int64_t stride_h, int64_t stride_w,
             int64_t pad_h, int64_t pad_w, int activation, bool weights_private, int layout, int precision)
        : OperatorPlan(float32_array(weight, "weight"), bias, weights_private, static_cast<pwcpu::Layout>(layout)),
          groups_(groups), geometry_{stride_h, stride_w, pad_h, pad_w}, activation_(activation),
          precision_(precision_of(precision)) {
        if (layout != static_cast<int>(pwcpu::Layout::nhwc) && layout != static_cast<int>(pwcpu::Layout::nchw)) {
            throw py::value_error("invalid layout code");
        }
        if (weight_.ndim() != 2) throw py::value_error("weight must be 2-D (K, C // groups)");
        if (groups < 1 || weight_.shape(0) % groups != 0) {
            throw py::value_error("groups must be >= 1 and divide the output channels");
        }
        if (stride_h < 1 || stride_w < 1 || pad_h < 0 || pad_w < 0) throw py::value_error("invalid stride or padding");
        if (activation < 0 || activation > static_cast<int>(pwcpu::kLastActivation)) {
            throw py::value_error("invalid activation code");
        }
        if (!float_aligned(weight_)) weight_ = numpy().attr("ascontiguousarray")(weight_);
        if (!bias_.is_none()) {
            py::array b = float32_array(bias_, "bias");
            if (b.ndim() != 1 || b.shape(0) != weight_.shape(0)) throw py::value_error("bias must have K elements");
            bias_contiguous_ = numpy().attr("ascontiguousarray")(b);
        }
        pack();
    }

    int64_t in_channels() const { return weight_.shape(1) * groups_; }
    int64_t out_channels() const { return weight_.shape(0); }
    const pwcpu::PackedWeights& packed() const { return *packed_; }

    py::array conv(const py::object& x_in, const py::object& residual, const py::object& out) {
        // A 4-D bfloat16 x, where the kernels take bfloat16: read as it is (conv_bfloat16), and a
        // bfloat16 out without a residual written by them (conv_bfloat16_into). Other bfloat16
        // calls are refused here (TypeError), and widened by the Python layer.
        if (is_bfloat16(x_in) && reads_bfloat16()) {
            py::array x_bits = bits_of(x_in);
            if (x_bits.ndim() == 4 && residual.is_none() && is_bfloat16(out)) {
                py::array out_bits = bits_of(out);
                if (out_bits.ndim() == 4 && (out_bits.shape(3) <= 1 || out_bits.strides(3) == 2) &&
                    !overlaps(out_bits, x_bits)) {
                    conv_bfloat16_into(x_bits, out_bits);
                    return py::reinterpret_borrow<py::array>(out);
                }
            } else if (x_bits.ndim() == 4 && !is_bfloat16(residual) && !is_bfloat16(out)) {
                return conv_bfloat16(x_bits, residual, out);
            }
        }
        const py::array x = float32_array(x_in, "x");
        const bool nchw = layout_ == pwcpu::Layout::nchw;
        if (x.ndim() != 4) {
            throw py::value_error(std::string("x must have shape ") + (nchw ? "(N, C, H, W)" : "(N, H, W, C)") +
                                  ", got shape " + text(x.attr("shape")));
        }
        check_channels(x, nchw ? 1 : 3, "");
        const int h = nchw ? 2 : 1, w = h + 1;
        const py::ssize_t ho = pwcpu::conv_output_size(x.shape(h), geometry_.pad_h, geometry_.stride_h);
        const py::ssize_t wo = pwcpu::conv_output_size(x.shape(w), geometry_.pad_w, geometry_.stride_w);
        const std::vector<py::ssize_t> shape = nchw ? std::vector<py::ssize_t>{x.shape(0), out_channels(), ho, wo}
                                                    : std::vector<py::ssize_t>{x.shape(0), ho, wo, out_channels()};
        return execute(x, residual, out, shape, false);
    }

    // x: the bits (uint16) of a 4-D NHWC bfloat16 array, read as they are where reads_bfloat16().
    py::array conv_bfloat16(const py::array& x_bits, const py::object& residual, const py::object& out) {
        if (!reads_bfloat16()) throw py::value_error("this layer's kernels do not read bfloat16 (reads_bfloat16)");
        if (x_bits.dtype().kind() != 'u' || x_bits.itemsize() != 2 || x_bits.ndim() != 4) {
            throw py::type_error("conv_bfloat16 takes the uint16 bits of a 4-D bfloat16 array");
        }
        check_channels(x_bits, 3, "");
        const py::ssize_t ho = pwcpu::conv_output_size(x_bits.shape(1), geometry_.pad_h, geometry_.stride_h);
        const py::ssize_t wo = pwcpu::conv_output_size(x_bits.shape(2), geometry_.pad_w, geometry_.stride_w);
        return execute(x_bits, residual, out, {x_bits.shape(0), ho, wo, out_channels()}, false, true);
    }

    // The same into out_bits, the uint16 bits of a bfloat16 array of the output's shape (channels
    // contiguous), each value rounded to nearest even as the kernels store it; no residual.
    py::array conv_bfloat16_into(const py::array& x_bits, py::array& out_bits) {
        if (!reads_bfloat16()) throw py::value_error("this layer's kernels do not read bfloat16 (reads_bfloat16)");
        const py::array* arrays[] = {&x_bits, &out_bits};
        for (const py::array* a : arrays) {
            if (a->dtype().kind() != 'u' || a->itemsize() != 2 || a->ndim() != 4) {
                throw py::type_error("conv_bfloat16_into takes the uint16 bits of 4-D bfloat16 arrays");
            }
        }
        check_channels(x_bits, 3, "");
        const std::vector<py::ssize_t> shape{
            x_bits.shape(0), pwcpu::conv_output_size(x_bits.shape(1), geometry_.pad_h, geometry_.stride_h),
            pwcpu::conv_output_size(x_bits.shape(2), geometry_.pad_w, geometry_.stride_w), out_channels()};
        if (shape_of(out_bits) != shape) {
            throw py::value_error("out must have shape " + text(shape_tuple(shape)) + ", got " + text(out_bits.attr("shape")));
        }
        if (!out_bits.writeable()) throw py::value_error("out must be writable");
        if (overlaps(out_bits, x_bits)) throw py::value_error("out overlaps x in memory; use a separate output array");
        if (overlaps_itself(out_bits)) throw py::value_error("out must not overlap itself");
        py::array x = x_bits;
        const pwcpu::BFloat16View xv = bfloat16_view(x);
        py::array out = out_bits;
        const pwcpu::BFloat16View ov = bfloat16_view(out);
        if (ov.data != out_bits.data()) throw py::value_error("out must have a contiguous channel (last) axis");
        const std::shared_ptr<const pwcpu::PackedWeights> packed = packed_;
        {
            py::gil_scoped_release release;
            packed->run_bfloat16(xv, ov, geometry_, static_cast<pwcpu::Activation>(activation_));
        }
        return out_bits;
    }

    bool reads_bfloat16() {
        if (!packed_->current()) pack();
        return packed_->reads_bfloat16();
    }

    py::array pointwise(const py::object& x_in, const py::object& residual, const py::object& out) {
        const py::array x = float32_array(x_in, "x");
        if (layout_ != pwcpu::Layout::nhwc) throw py::value_error("pointwise() takes channels-last data");
        if (x.ndim() < 1) throw py::value_error("x must have at least one axis (the channels), got a scalar");
        check_channels(x, x.ndim() - 1, " (last axis)");
        std::vector<py::ssize_t> shape = shape_of(x);
        shape.back() = out_channels();
        return execute(x, residual, out, shape, true);
    }

private:
    int64_t expected_in_channels() const override { return in_channels(); }
    std::array<int64_t, 4> output_shape_of(const TensorView& x) const override { return packed_->output_shape(x, geometry_); }

    void run(const TensorView& x, const TensorView& out, const TensorView* residual) override {
        if (!packed_->current()) pack();  // the ISA was switched: pack for its kernels
        const std::shared_ptr<const pwcpu::PackedWeights> packed = packed_;
        py::gil_scoped_release release;
        packed->run(x, out, residual, geometry_, static_cast<pwcpu::Activation>(activation_));
    }

    void run_bfloat16(const pwcpu::BFloat16View& x, const TensorView& out, const TensorView* residual) override {
        const std::shared_ptr<const pwcpu::PackedWeights> packed = packed_;  // packed for the current ISA (conv_bfloat16)
        py::gil_scoped_release release;
        packed->run_bfloat16(x, out, residual, geometry_, static_cast<pwcpu::Activation>(activation_));
    }

    void pack() {
        const py::object& bias = bias_contiguous_;
        const float* b = bias.is_none() ? nullptr : static_cast<const float*>(py::array(bias).data());
        const auto* w = static_cast<const float*>(weight_.data());
        const int64_t rs = weight_.strides(0) / static_cast<py::ssize_t>(sizeof(float));
        const int64_t cs = weight_.strides(1) / static_cast<py::ssize_t>(sizeof(float));
        const int64_t k = weight_.shape(0), cg = weight_.shape(1);
        std::shared_ptr<const pwcpu::PackedWeights> packed;
        {
            py::gil_scoped_release release;
            packed = std::make_shared<const pwcpu::PackedWeights>(w, k, cg, rs, cs, b, groups_, layout_, precision_);
        }
        packed_ = std::move(packed);  // with the GIL held: other threads read packed_ under it
    }

    void check_channels(const py::array& x, py::ssize_t axis, const char* where) const {
        const int64_t c = x.shape(axis);
        if (c == in_channels()) return;
        std::string msg = "x has " + std::to_string(c) + " channels" + where + " but the weight expects C = " +
                          std::to_string(in_channels());
        if (groups_ > 1) {
            msg += " (C // groups = " + std::to_string(weight_.shape(1)) + ", groups = " + std::to_string(groups_) + ")";
        }
        throw py::value_error(msg);
    }

public:
    // The PyTorch bridge's eager path, for tensors it has already checked (float32, CPU, 4-D, with
    // the shapes below): x is NCHW-shaped (N, C, H, W) with element strides, out a fresh
    // contiguous (N, Ho, Wo, K) buffer, residual NCHW-shaped (N, K, Ho, Wo) or a null pointer.
    // Returns false, computing nothing, unless the channels of x and residual are contiguous
    // (channels_last memory): the caller then takes the general path.
private:
    py::object bias_contiguous_ = py::none();   // what is packed
    int64_t groups_;
    pwcpu::ConvGeometry geometry_;
    int activation_;
    pwcpu::Precision precision_;
    // Shared: a call keeps its packing alive while another thread re-packs (after an ISA switch).
    std::shared_ptr<const pwcpu::PackedWeights> packed_;
};

// A convolution over kh x kw windows, NHWC data: depthwise (weight (C, kh, kw)) or dense (weight
// (K, C, kh, kw)), packed by the core's DepthwiseWeights or DenseConvWeights.
template <class Weights>
class WindowPlan : public OperatorPlan {
    static constexpr bool kDense = std::is_same_v<Weights, pwcpu::DenseConvWeights>;
    static constexpr int kDims = kDense ? 4 : 3;

public:
    WindowPlan(const py::array& weight, const py::object& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h,
               int64_t pad_w, int activation, bool weights_private, int64_t groups = 1)
        : OperatorPlan(float32_array(weight, "weight"), bias, weights_private, pwcpu::Layout::nhwc),
          geometry_{stride_h, stride_w, pad_h, pad_w}, activation_(activation), groups_(groups) {
        if (groups < 1 || (!kDense && groups != 1)) throw py::value_error("groups must be >= 1");
        if (weight_.ndim() == kDims && weight_.shape(0) % groups != 0) {
            throw py::value_error("groups (" + std::to_string(groups) + ") must divide the " +
                                  std::to_string(weight_.shape(0)) + " output channels");
        }
        if (weight_.ndim() != kDims) throw py::value_error(kDense ? "weight must be 4-D (K, C, kh, kw)" : "weight must be 3-D (C, kh, kw)");
        if (weight_.shape(kDims - 2) < 1 || weight_.shape(kDims - 1) < 1) throw py::value_error("the kernel must be at least 1x1");
        if (stride_h < 1 || stride_w < 1 || pad_h < 0 || pad_w < 0) throw py::value_error("invalid stride or padding");
        if (activation < 0 || activation > static_cast<int>(pwcpu::kLastActivation)) {
            throw py::value_error("invalid activation code");
        }
        weight_contiguous_ = numpy().attr("ascontiguousarray")(weight_);
        if (!bias_.is_none()) {
            py::array b = float32_array(bias_, "bias");
            if (b.ndim() != 1 || b.shape(0) != weight_.shape(0)) throw py::value_error("bias must have one value per filter");
            bias_contiguous_ = numpy().attr("ascontiguousarray")(b);
        }
        pack();
    }

    int64_t out_channels() const { return weight_.shape(0); }
    int64_t in_channels() const { return kDense ? weight_.shape(1) * groups_ : weight_.shape(0); }
    const Weights& packed() const { return *packed_; }

    py::array conv(const py::object& x_in, const py::object& residual, const py::object& out) {
        const py::array x = float32_array(x_in, "x");
        if (x.ndim() != 4) throw py::value_error("x must have shape (N, H, W, C), got shape " + text(x.attr("shape")));
        if (x.shape(3) != in_channels()) {
            throw py::value_error("x has " + std::to_string(x.shape(3)) + " channels but the weight " +
                                  (kDense ? "takes C = " : "has C = ") + std::to_string(in_channels()) +
                                  (kDense ? "" : " filters"));
        }
        const py::ssize_t ho = pwcpu::conv_output_size(x.shape(1), geometry_.pad_h, geometry_.stride_h, weight_.shape(kDims - 2));
        const py::ssize_t wo = pwcpu::conv_output_size(x.shape(2), geometry_.pad_w, geometry_.stride_w, weight_.shape(kDims - 1));
        return execute(x, residual, out, {x.shape(0), ho, wo, out_channels()}, false);
    }

private:
    int64_t expected_in_channels() const override { return in_channels(); }
    std::array<int64_t, 4> output_shape_of(const TensorView& x) const override { return packed_->output_shape(x, geometry_); }

    void run(const TensorView& x, const TensorView& out, const TensorView* residual) override {
        if (packed_->isa() != pwcpu::active_isa()) pack();  // the ISA was switched: pack for its kernels
        const std::shared_ptr<const Weights> packed = packed_;
        py::gil_scoped_release release;
        packed->run(x, out, residual, geometry_, static_cast<pwcpu::Activation>(activation_));
    }

    void pack() {
        const float* w = static_cast<const float*>(weight_contiguous_.data());
        const float* b = bias_contiguous_.is_none() ? nullptr : static_cast<const float*>(py::array(bias_contiguous_).data());
        const int64_t kh = weight_.shape(kDims - 2), kw = weight_.shape(kDims - 1);
        std::shared_ptr<const Weights> packed;
        {
            py::gil_scoped_release release;
            if constexpr (kDense) {
                packed = std::make_shared<const Weights>(w, out_channels(), in_channels(), kh, kw, b, groups_);
            } else {
                packed = std::make_shared<const Weights>(w, out_channels(), kh, kw, b);
            }
        }
        packed_ = std::move(packed);
    }

    py::array weight_contiguous_;
    py::object bias_contiguous_ = py::none();
    pwcpu::ConvGeometry geometry_;
    int activation_;
    int64_t groups_;
    std::shared_ptr<const Weights> packed_;
};

using DepthwisePlan = WindowPlan<pwcpu::DepthwiseWeights>;
using DenseConvPlan = WindowPlan<pwcpu::DenseConvWeights>;

// A fused inverted residual block; its weights are private (the Python class keeps frozen copies).
class BlockPlan : public OperatorPlan {
public:
    BlockPlan(const py::object& expand_weight, const py::object& expand_bias, const py::array& depthwise_weight,
              const py::object& depthwise_bias, const py::array& project_weight, const py::object& project_bias,
              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int expand_activation,
              int depthwise_activation, int project_activation, bool residual, const py::object& se_reduce_weight,
              const py::object& se_reduce_bias, const py::object& se_expand_weight, const py::object& se_expand_bias,
              int se_activation, int se_gate, int precision)
        : OperatorPlan(float32_array(project_weight, "project_weight"), py::none(), true, pwcpu::Layout::nhwc) {
        w_.precision = precision_of(precision);
        const auto contiguous = [](const py::object& a, const char* name) -> py::object {
            return a.is_none() ? py::object(py::none()) : numpy().attr("ascontiguousarray")(float32_array(a, name));
        };
        expand_w_ = contiguous(expand_weight, "expand_weight");
        expand_b_ = contiguous(expand_bias, "expand_bias");
        dw_w_ = contiguous(depthwise_weight, "depthwise_weight");
        dw_b_ = contiguous(depthwise_bias, "depthwise_bias");
        project_w_ = contiguous(project_weight, "project_weight");
        project_b_ = contiguous(project_bias, "project_bias");
        se_reduce_w_ = contiguous(se_reduce_weight, "se_reduce_weight");
        se_reduce_b_ = contiguous(se_reduce_bias, "se_reduce_bias");
        se_expand_w_ = contiguous(se_expand_weight, "se_expand_weight");
        se_expand_b_ = contiguous(se_expand_bias, "se_expand_bias");
        const py::array dw = dw_w_, pw = project_w_;
        if (dw.ndim() != 3 || pw.ndim() != 2) throw py::value_error("depthwise weight must be (E, kh, kw), project weight (K, E)");
        for (int a : {expand_activation, depthwise_activation, project_activation, se_activation, se_gate}) {
            if (a < 0 || a > static_cast<int>(pwcpu::kLastActivation)) throw py::value_error("invalid activation code");
        }
        w_.hidden_channels = dw.shape(0);
        w_.kernel_h = dw.shape(1);
        w_.kernel_w = dw.shape(2);
        w_.out_channels = pw.shape(0);
        if (pw.shape(1) != w_.hidden_channels) throw py::value_error("project weight must have E columns");
        if (!expand_w_.is_none()) {
            const py::array ew = expand_w_;
            if (ew.ndim() != 2 || ew.shape(0) != w_.hidden_channels) throw py::value_error("expand weight must be (E, C)");
            w_.in_channels = ew.shape(1);
        } else {
            w_.in_channels = w_.hidden_channels;
        }
        const auto vector_of = [](const py::object& a, int64_t n) {
            return a.is_none() || (py::array(a).ndim() == 1 && py::array(a).shape(0) == n);
        };
        if (!vector_of(expand_b_, w_.hidden_channels) || !vector_of(dw_b_, w_.hidden_channels) ||
            !vector_of(project_b_, w_.out_channels)) {
            throw py::value_error("a bias does not match its layer's output channels");
        }
        if (se_reduce_w_.is_none() != se_expand_w_.is_none()) {
            throw py::value_error("squeeze-excitation needs both se_reduce_weight and se_expand_weight");
        }
        if (!se_reduce_w_.is_none()) {
            const py::array reduce = se_reduce_w_, expand = se_expand_w_;
            if (reduce.ndim() != 2 || reduce.shape(1) != w_.hidden_channels || expand.ndim() != 2 ||
                expand.shape(0) != w_.hidden_channels || expand.shape(1) != reduce.shape(0) ||
                !vector_of(se_reduce_b_, reduce.shape(0)) || !vector_of(se_expand_b_, w_.hidden_channels)) {
                throw py::value_error("squeeze-excitation weights must be (S, E) and (E, S), biases S and E values");
            }
            w_.se_channels = reduce.shape(0);
        }
        w_.se_activation = static_cast<pwcpu::Activation>(se_activation);
        w_.se_gate = static_cast<pwcpu::Activation>(se_gate);
        w_.depthwise_geometry = {stride_h, stride_w, pad_h, pad_w};
        w_.expand_activation = static_cast<pwcpu::Activation>(expand_activation);
        w_.depthwise_activation = static_cast<pwcpu::Activation>(depthwise_activation);
        w_.project_activation = static_cast<pwcpu::Activation>(project_activation);
        w_.residual = residual;
        pack();
    }

    int64_t in_channels() const { return w_.in_channels; }
    int64_t out_channels() const { return w_.out_channels; }
    const pwcpu::InvertedResidual& block() const { return *block_; }

    py::array conv(const py::object& x_in, const py::object& out) {
        const py::array x = float32_array(x_in, "x");
        if (x.ndim() != 4) throw py::value_error("x must have shape (N, H, W, C), got shape " + text(x.attr("shape")));
        if (x.shape(3) != in_channels()) {
            throw py::value_error("x has " + std::to_string(x.shape(3)) + " channels but the block expects C = " +
                                  std::to_string(in_channels()));
        }
        TensorView probe;
        for (int d = 0; d < 4; ++d) probe.shape[d] = x.shape(d);
        const std::array<int64_t, 4> shape = block_->output_shape(probe);
        return execute(x, py::none(), out, {shape[0], shape[1], shape[2], shape[3]}, false);
    }

private:
    int64_t expected_in_channels() const override { return in_channels(); }
    std::array<int64_t, 4> output_shape_of(const TensorView& x) const override { return block_->output_shape(x); }

    void run(const TensorView& x, const TensorView& out, const TensorView*) override {
        if (block_->isa() != pwcpu::active_isa()) pack();  // the ISA was switched: pack for its kernels
        const std::shared_ptr<const pwcpu::InvertedResidual> block = block_;
        py::gil_scoped_release release;
        block->run(x, out);
    }

    static const float* data_of(const py::object& a) {
        return a.is_none() ? nullptr : static_cast<const float*>(py::array(a).data());
    }

    void pack() {
        pwcpu::InvertedResidualWeights w = w_;
        w.expand_weight = data_of(expand_w_);
        w.expand_bias = data_of(expand_b_);
        w.depthwise_weight = data_of(dw_w_);
        w.depthwise_bias = data_of(dw_b_);
        w.project_weight = data_of(project_w_);
        w.project_bias = data_of(project_b_);
        w.se_reduce_weight = data_of(se_reduce_w_);
        w.se_reduce_bias = data_of(se_reduce_b_);
        w.se_expand_weight = data_of(se_expand_w_);
        w.se_expand_bias = data_of(se_expand_b_);
        std::shared_ptr<const pwcpu::InvertedResidual> block;
        {
            py::gil_scoped_release release;
            block = std::make_shared<const pwcpu::InvertedResidual>(w);
        }
        block_ = std::move(block);
    }

    py::object expand_w_, expand_b_, dw_w_, dw_b_, project_w_, project_b_, se_reduce_w_, se_reduce_b_, se_expand_w_,
        se_expand_b_;
    pwcpu::InvertedResidualWeights w_;
    std::shared_ptr<const pwcpu::InvertedResidual> block_;
};

// Static int8 (ONNX QLinearConv, 1x1, NHWC): 8-bit x and out, the layer's quantization
// parameters fixed at construction. The Python API has checked the types of the weights and
// parameters; the core checks their values.
class QuantizedConvPlan {
public:
    QuantizedConvPlan(const py::array& weight, const py::array& w_scale, const py::array& w_zero_point,
                      const py::object& bias, int64_t groups, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                      int64_t pad_w, float x_scale, int32_t x_zero_point, bool x_signed, float y_scale,
                      int32_t y_zero_point, bool y_signed)
        : groups_(groups), geometry_{stride_h, stride_w, pad_h, pad_w} {
        weight_ = py::array(numpy().attr("ascontiguousarray")(weight));
        w_scale_ = py::array_t<float, py::array::c_style | py::array::forcecast>(w_scale);
        w_zero_point_ = py::array_t<int32_t, py::array::c_style | py::array::forcecast>(w_zero_point);
        has_bias_ = !bias.is_none();
        if (has_bias_) bias_ = py::array_t<int32_t, py::array::c_style | py::array::forcecast>(bias);
        params_.weight_signed = weight_.dtype().equal(py::dtype::of<int8_t>());
        params_.x_scale = x_scale;
        params_.x_zero_point = x_zero_point;
        params_.x_signed = x_signed;
        params_.y_scale = y_scale;
        params_.y_zero_point = y_zero_point;
        params_.y_signed = y_signed;
        pack();
    }

    py::array conv(const py::object& x_in, const py::object& out_in) {
        if (!packed_->current()) pack();  // the ISA was switched: pack for its kernels
        const py::dtype x_type = params_.x_signed ? py::dtype::of<int8_t>() : py::dtype::of<uint8_t>();
        const py::dtype y_type = params_.y_signed ? py::dtype::of<int8_t>() : py::dtype::of<uint8_t>();
        const char* x_name = params_.x_signed ? "int8" : "uint8";
        const char* y_name = params_.y_signed ? "int8" : "uint8";
        if (!py::isinstance<py::array>(x_in)) throw py::type_error(std::string("x must be a NumPy ") + x_name + " array");
        py::array x = py::reinterpret_borrow<py::array>(x_in);
        if (!x.dtype().equal(x_type)) {
            throw py::type_error(std::string("x must be ") + x_name + " (as x_zero_point), got " +
                                 py::str(x.dtype()).cast<std::string>());
        }
        if (x.ndim() != 4) throw py::value_error("x must be 4-D (N, H, W, C), got shape " + text(x.attr("shape")));
        if (x.shape(3) > 1 && x.strides(3) != 1) x = py::array(numpy().attr("ascontiguousarray")(x));
        const pwcpu::QuantizedView xv = view_of(x);
        const pwcpu::TensorView shape_only{nullptr, {xv.shape[0], xv.shape[1], xv.shape[2], xv.shape[3]}, {}};
        if (xv.shape[3] != packed_->in_channels()) {
            throw py::value_error("x has " + std::to_string(xv.shape[3]) + " channels; the weights take " +
                                  std::to_string(packed_->in_channels()));
        }
        const std::array<int64_t, 4> shape = packed_->output_shape(shape_only, geometry_);
        const std::vector<py::ssize_t> out_shape(shape.begin(), shape.end());
        py::array out;
        if (out_in.is_none()) {
            out = py::array(y_type, out_shape);
        } else {
            if (!py::isinstance<py::array>(out_in)) throw py::type_error(std::string("out must be a NumPy ") + y_name + " array");
            out = py::reinterpret_borrow<py::array>(out_in);
            if (!out.dtype().equal(y_type)) {
                throw py::type_error(std::string("out must be ") + y_name + " (as y_zero_point), got " +
                                     py::str(out.dtype()).cast<std::string>());
            }
            if (shape_of(out) != out_shape) {
                throw py::value_error("out must have shape " + text(shape_tuple(out_shape)) + ", got " + text(out.attr("shape")));
            }
            if (!out.writeable()) throw py::value_error("out must be writable");
            if (out.shape(3) > 1 && out.strides(3) != 1) throw py::value_error("out must have a contiguous channel (last) axis");
            if (overlaps_itself(out)) throw py::value_error("out must not overlap itself");
            if (overlaps(out, x)) throw py::value_error("out overlaps x in memory; use a separate output array");
        }
        const pwcpu::QuantizedView ov = view_of(out);
        const std::shared_ptr<const pwcpu::PackedWeights> packed = packed_;
        {
            py::gil_scoped_release release;
            packed->run_quantized(xv, ov, geometry_);
        }
        return out;
    }

    const pwcpu::PackedWeights& packed() const { return *packed_; }

private:
    static pwcpu::QuantizedView view_of(const py::array& a) {
        pwcpu::QuantizedView v;
        v.data = static_cast<uint8_t*>(const_cast<void*>(a.data()));
        for (int d = 0; d < 4; ++d) {
            v.shape[d] = a.shape(d);
            v.strides[d] = a.strides(d);  // bytes are elements
        }
        return v;
    }

    void pack() {
        pwcpu::QuantizedConvParams params = params_;
        const int64_t k = weight_.shape(0), cg = weight_.ndim() > 1 ? weight_.shape(1) : 0;
        if (w_scale_.size() != k || w_zero_point_.size() != k || (has_bias_ && bias_.size() != k)) {
            throw py::value_error("w_scale, w_zero_point and bias need one value per output channel");
        }
        params.weight = weight_.data();
        params.weight_scale = w_scale_.data();
        params.weight_zero_point = w_zero_point_.data();
        params.bias = has_bias_ ? bias_.data() : nullptr;
        packed_ = std::make_shared<const pwcpu::PackedWeights>(params, k, cg, groups_);
    }

    py::array weight_;
    py::array_t<float> w_scale_;
    py::array_t<int32_t> w_zero_point_;
    py::array_t<int32_t> bias_;
    bool has_bias_ = false;
    int64_t groups_;
    pwcpu::ConvGeometry geometry_;
    pwcpu::QuantizedConvParams params_;
    std::shared_ptr<const pwcpu::PackedWeights> packed_;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "pwcpu's compiled core: packed weights, the convolution driver and runtime control";
    m.attr("__version__") = PWCPU_VERSION;

    py::class_<ConvPlan>(m, "ConvPlan")
        .def(py::init<const py::array&, const py::object&, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool, int,
                      int>(),
             py::arg("weight"), py::arg("bias"), py::arg("groups"), py::arg("stride_h"), py::arg("stride_w"),
             py::arg("pad_h"), py::arg("pad_w"), py::arg("activation"), py::arg("weights_private"),
             py::arg("layout") = 0, py::arg("precision") = 0)
        .def("conv", &ConvPlan::conv, py::arg("x"), py::arg("residual"), py::arg("out"))
        .def("conv_bfloat16", &ConvPlan::conv_bfloat16, py::arg("x_bits"), py::arg("residual"), py::arg("out"))
        .def("conv_bfloat16_into", &ConvPlan::conv_bfloat16_into, py::arg("x_bits"), py::arg("out_bits"))
        .def_property_readonly("reads_bfloat16", &ConvPlan::reads_bfloat16)
        .def("pointwise", &ConvPlan::pointwise, py::arg("x"), py::arg("residual"), py::arg("out"))
        .def("conv_channels_last", &ConvPlan::conv_channels_last)
        .def_property_readonly("isa", [](const ConvPlan& p) { return p.packed().isa(); })
        .def_property_readonly("kernel", [](const ConvPlan& p) { return p.packed().kernel_name(); })
        .def_property_readonly("precision", [](const ConvPlan& p) { return static_cast<int>(p.packed().precision()); })
        .def_property_readonly("out_channels", &ConvPlan::out_channels)
        .def_property_readonly("in_channels", &ConvPlan::in_channels);

    py::class_<QuantizedConvPlan>(m, "QuantizedConvPlan")
        .def(py::init<const py::array&, const py::array&, const py::array&, const py::object&, int64_t, int64_t,
                      int64_t, int64_t, int64_t, float, int32_t, bool, float, int32_t, bool>(),
             py::arg("weight"), py::arg("w_scale"), py::arg("w_zero_point"), py::arg("bias"), py::arg("groups"),
             py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("x_scale"),
             py::arg("x_zero_point"), py::arg("x_signed"), py::arg("y_scale"), py::arg("y_zero_point"),
             py::arg("y_signed"))
        .def("conv", &QuantizedConvPlan::conv, py::arg("x"), py::arg("out"))
        .def_property_readonly("isa", [](const QuantizedConvPlan& p) { return p.packed().isa(); })
        .def_property_readonly("kernel", [](const QuantizedConvPlan& p) { return p.packed().kernel_name(); });

    py::class_<DepthwisePlan>(m, "DepthwisePlan")
        .def(py::init<const py::array&, const py::object&, int64_t, int64_t, int64_t, int64_t, int, bool>(),
             py::arg("weight"), py::arg("bias"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"),
             py::arg("pad_w"), py::arg("activation"), py::arg("weights_private"))
        .def("conv", &DepthwisePlan::conv, py::arg("x"), py::arg("residual"), py::arg("out"))
        .def("conv_channels_last", &DepthwisePlan::conv_channels_last)
        .def_property_readonly("isa", [](const DepthwisePlan& p) { return p.packed().isa(); })
        .def_property_readonly("kernel", [](const DepthwisePlan& p) { return p.packed().kernel_name(); })
        .def_property_readonly("channels", &DepthwisePlan::out_channels);

    py::class_<DenseConvPlan>(m, "DenseConvPlan")
        .def(py::init<const py::array&, const py::object&, int64_t, int64_t, int64_t, int64_t, int, bool, int64_t>(),
             py::arg("weight"), py::arg("bias"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"),
             py::arg("pad_w"), py::arg("activation"), py::arg("weights_private"), py::arg("groups") = 1)
        .def("conv", &DenseConvPlan::conv, py::arg("x"), py::arg("residual"), py::arg("out"))
        .def("conv_channels_last", &DenseConvPlan::conv_channels_last)
        .def_property_readonly("isa", [](const DenseConvPlan& p) { return p.packed().isa(); })
        .def_property_readonly("kernel", [](const DenseConvPlan& p) { return p.packed().kernel_name(); })
        .def_property_readonly("out_channels", &DenseConvPlan::out_channels)
        .def_property_readonly("in_channels", &DenseConvPlan::in_channels)
        .def_property_readonly("groups", [](const DenseConvPlan& p) { return p.packed().groups(); });

    py::class_<BlockPlan>(m, "BlockPlan")
        .def(py::init<const py::object&, const py::object&, const py::array&, const py::object&, const py::array&,
                      const py::object&, int64_t, int64_t, int64_t, int64_t, int, int, int, bool, const py::object&,
                      const py::object&, const py::object&, const py::object&, int, int, int>(),
             py::arg("expand_weight"), py::arg("expand_bias"), py::arg("depthwise_weight"), py::arg("depthwise_bias"),
             py::arg("project_weight"), py::arg("project_bias"), py::arg("stride_h"), py::arg("stride_w"),
             py::arg("pad_h"), py::arg("pad_w"), py::arg("expand_activation"), py::arg("depthwise_activation"),
             py::arg("project_activation"), py::arg("residual"), py::arg("se_reduce_weight") = py::none(),
             py::arg("se_reduce_bias") = py::none(), py::arg("se_expand_weight") = py::none(),
             py::arg("se_expand_bias") = py::none(), py::arg("se_activation") = 3, py::arg("se_gate") = 6,
             py::arg("precision") = 0)
        .def("conv", &BlockPlan::conv, py::arg("x"), py::arg("out"))
        .def("conv_channels_last", &BlockPlan::conv_channels_last)
        .def_property_readonly("isa", [](const BlockPlan& p) { return p.block().isa(); })
        .def_property_readonly("in_channels", &BlockPlan::in_channels)
        .def_property_readonly("out_channels", &BlockPlan::out_channels);

    m.def("output_array", [](py::ssize_t floats) { return aligned_output({floats}); }, py::arg("floats"),
          "A new float32 array of `floats` elements on pwcpu's output buffers (for the PyTorch bridge).");
    m.def("as_float32", [](const py::object& value, const std::string& name) { return float32_array(value, name); },
          py::arg("value"), py::arg("name"));
    m.def("interleave_channels", [](uintptr_t out_data, const py::list& sources) {
        // For pwcpu.torch.channel_shuffle: each source a float32 tensor's (data pointer, NCHW size,
        // strides); out_data a channels_last tensor of their interleaved channels.
        if (sources.empty()) throw py::value_error("interleave_channels: no sources");
        std::vector<TensorView> views(sources.size());
        for (size_t g = 0; g < views.size(); ++g) {
            const py::tuple source = sources[g].cast<py::tuple>();
            const py::tuple shape = source[1].cast<py::tuple>(), strides = source[2].cast<py::tuple>();
            if (shape.size() != 4 || strides.size() != 4) throw py::value_error("interleave_channels: 4-D sources only");
            nhwc_of_nchw(source[0].cast<uintptr_t>(), shape, strides, views[g]);
            if (!std::equal(views[g].shape, views[g].shape + 4, views[0].shape)) {
                throw py::value_error("interleave_channels: the sources' shapes differ");
            }
        }
        py::gil_scoped_release no_gil;
        pwcpu::interleave_channels(views.data(), static_cast<int>(views.size()), reinterpret_cast<float*>(out_data));
    }, py::arg("out_data"), py::arg("sources"));
    m.def("channel_means", [](uintptr_t out_data, uintptr_t x_data, const py::tuple& shape, const py::tuple& strides) {
        // For pwcpu.torch's global average pooling: x a float32 tensor's (data pointer, NCHW size,
        // strides), out_data N x C floats.
        if (shape.size() != 4 || strides.size() != 4) throw py::value_error("channel_means: a 4-D x only");
        TensorView view;
        nhwc_of_nchw(x_data, shape, strides, view);
        py::gil_scoped_release no_gil;
        pwcpu::channel_means(view, reinterpret_cast<float*>(out_data));
    }, py::arg("out_data"), py::arg("x_data"), py::arg("shape"), py::arg("strides"));
    m.def("get_num_threads", &pwcpu::get_num_threads);
    m.def("set_num_threads", &pwcpu::set_num_threads, py::arg("n"));
    m.def("set_num_threads_for_this_thread", &pwcpu::set_num_threads_for_this_thread, py::arg("n"));
    m.def("measure_fma_peak_gflops", &pwcpu::measure_fma_peak_gflops, py::arg("threads"), py::arg("seconds"),
          py::call_guard<py::gil_scoped_release>());
    m.def("select_isa", &pwcpu::select_isa, py::arg("name"));
    m.def("set_max_reduction_block", &pwcpu::set_max_reduction_block, py::arg("channels"));
    m.def("set_take_rows_first", &pwcpu::set_take_rows_first, py::arg("first"));
    m.def("active_isa", &pwcpu::active_isa);
    m.def("runtime_info", [] {
        const pwcpu::RuntimeInfo info = pwcpu::runtime_info();
        py::dict d;
        d["isa"] = info.isa;
        d["isa_reason"] = info.isa_reason;
        d["cpu_features"] = info.cpu_features;
        d["supported_isas"] = info.supported_isas;
        d["kernel_main"] = info.kernel_main;
        d["gemm_kernels"] = info.gemm_kernels;
        d["gemm_kernel_speeds"] = info.gemm_kernel_speeds;
        d["bf16_gemm_kernels"] = info.bf16_gemm_kernels;
        d["int8_gemm_kernels"] = info.int8_gemm_kernels;
        d["int8_isa"] = info.int8_isa;
        d["int8_isa_reason"] = info.int8_isa_reason;
        d["bf16_isa"] = info.bf16_isa;
        d["bf16_isa_reason"] = info.bf16_isa_reason;
        d["kernel_depthwise"] = info.kernel_depthwise;
        d["l1d_bytes"] = info.l1d_bytes;
        d["l2_bytes"] = info.l2_bytes;
        d["l3_bytes"] = info.l3_bytes;
        d["stream_store_min_bytes"] = info.stream_store_min_bytes;
        d["streamed_output_calls"] = info.streamed_output_calls;
        d["reused_output_buffers"] = info.reused_output_buffers;
        d["scratch_misses"] = info.scratch_misses;
        const auto& timed = info.timed_choice_calls;
        d["timed_choice_calls"] = py::make_tuple(timed[0], timed[1], timed[2], timed[3]);
        d["single_threaded_after_fork"] = pwcpu::single_threaded_after_fork();
        return d;
    });
}
