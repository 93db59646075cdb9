// pybind11 bindings: a thin layer over pwcpu.hpp. The Python API (python/pwcpu) validates and
// explains; this layer re-checks what memory safety depends on, converts, and releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "pwcpu/pwcpu.hpp"

namespace py = pybind11;

namespace {

bool is_native_float32(const py::array& a) {
    return a.dtype().kind() == 'f' && a.itemsize() == 4 && a.dtype().equal(py::dtype::of<float>());
}

pwcpu::TensorView nhwc_view(const py::array& a, const char* name, bool writable) {
    if (!is_native_float32(a)) throw py::type_error(std::string(name) + " must be a float32 array");
    if (a.ndim() != 4) throw py::value_error(std::string(name) + " must be 4-D (N, H, W, C)");
    if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
    if (reinterpret_cast<uintptr_t>(a.data()) % alignof(float) != 0) {
        throw py::value_error(std::string(name) + " must be aligned to float32");
    }
    pwcpu::TensorView v;
    v.data = static_cast<float*>(const_cast<void*>(a.data()));
    for (int d = 0; d < 4; ++d) {
        v.shape[d] = a.shape(d);
        if (a.strides(d) % static_cast<py::ssize_t>(sizeof(float)) != 0) {
            throw py::value_error(std::string(name) + " strides must be multiples of 4 bytes");
        }
        v.strides[d] = a.strides(d) / static_cast<py::ssize_t>(sizeof(float));
    }
    if (a.size() > 0 && v.shape[3] > 1 && v.strides[3] != 1) {
        throw py::value_error(std::string(name) + " must have a contiguous channel axis");
    }
    return v;
}

int64_t conv_extent(int64_t in, int64_t pad, int64_t stride) {
    const int64_t padded = in + 2 * pad;
    return padded > 0 ? (padded - 1) / stride + 1 : 0;
}

class PyPackedWeights {
public:
    PyPackedWeights(const py::array& weight, const py::object& bias, int64_t groups) {
        if (!is_native_float32(weight) || weight.ndim() != 2) {
            throw py::type_error("weight must be a 2-D float32 array (K, C // groups)");
        }
        if (groups < 1 || weight.shape(0) % groups != 0) {
            throw py::value_error("groups must be >= 1 and divide the output channels");
        }
        const float* bias_data = nullptr;
        py::array bias_array;
        if (!bias.is_none()) {
            bias_array = py::array::ensure(bias, py::array::c_style);
            if (!bias_array || !is_native_float32(bias_array) || bias_array.ndim() != 1) {
                throw py::type_error("bias must be a 1-D float32 array or None");
            }
            if (bias_array.shape(0) != weight.shape(0)) throw py::value_error("bias must have K elements");
            bias_data = static_cast<const float*>(bias_array.data());
        }
        for (int d = 0; d < 2; ++d) {
            if (weight.strides(d) % static_cast<py::ssize_t>(sizeof(float)) != 0) {
                throw py::value_error("weight strides must be multiples of 4 bytes");
            }
        }
        if (reinterpret_cast<uintptr_t>(weight.data()) % alignof(float) != 0) {
            throw py::value_error("weight must be aligned to float32");
        }
        const auto* w = static_cast<const float*>(weight.data());
        const int64_t rs = weight.strides(0) / static_cast<py::ssize_t>(sizeof(float));
        const int64_t cs = weight.strides(1) / static_cast<py::ssize_t>(sizeof(float));
        py::gil_scoped_release release;
        packed_ = std::make_unique<pwcpu::PackedWeights>(w, weight.shape(0), weight.shape(1), rs, cs, bias_data, groups);
    }

    void run(const py::array& x, const py::array& out, const py::object& residual, int64_t stride_h, int64_t stride_w,
             int64_t pad_h, int64_t pad_w, int activation) const {
        const pwcpu::TensorView xv = nhwc_view(x, "x", false);
        const pwcpu::TensorView ov = nhwc_view(out, "out", true);
        if (stride_h < 1 || stride_w < 1 || pad_h < 0 || pad_w < 0) throw py::value_error("invalid stride or padding");
        if (activation < 0 || activation > static_cast<int>(pwcpu::Activation::sigmoid)) {
            throw py::value_error("invalid activation code");
        }
        if (xv.shape[3] != packed_->in_channels()) throw py::value_error("x has the wrong number of channels");
        const int64_t expected[4] = {xv.shape[0], conv_extent(xv.shape[1], pad_h, stride_h),
                                     conv_extent(xv.shape[2], pad_w, stride_w), packed_->out_channels()};
        for (int d = 0; d < 4; ++d) {
            if (ov.shape[d] != expected[d]) throw py::value_error("out has the wrong shape");
        }
        pwcpu::TensorView rv;
        const pwcpu::TensorView* rp = nullptr;
        if (!residual.is_none()) {
            rv = nhwc_view(py::cast<py::array>(residual), "residual", false);
            for (int d = 0; d < 4; ++d) {
                if (rv.shape[d] != ov.shape[d]) throw py::value_error("residual must have the output's shape");
            }
            rp = &rv;
        }
        const pwcpu::ConvGeometry geometry{stride_h, stride_w, pad_h, pad_w};
        py::gil_scoped_release release;
        packed_->run(xv, ov, rp, geometry, static_cast<pwcpu::Activation>(activation));
    }

    const pwcpu::PackedWeights& packed() const { return *packed_; }

private:
    std::unique_ptr<pwcpu::PackedWeights> packed_;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "pwcpu's compiled core: packed weights, the convolution driver and runtime control";
    m.attr("__version__") = PWCPU_VERSION;

    py::class_<PyPackedWeights>(m, "PackedWeights")
        .def(py::init<const py::array&, const py::object&, int64_t>(), py::arg("weight"), py::arg("bias"),
             py::arg("groups"))
        .def("run", &PyPackedWeights::run, py::arg("x"), py::arg("out"), py::arg("residual"), py::arg("stride_h"),
             py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("activation"))
        .def_property_readonly("isa", [](const PyPackedWeights& p) { return p.packed().isa(); })
        .def_property_readonly("kernel", [](const PyPackedWeights& p) { return p.packed().kernel_name(); })
        .def_property_readonly("out_channels", [](const PyPackedWeights& p) { return p.packed().out_channels(); })
        .def_property_readonly("in_channels", [](const PyPackedWeights& p) { return p.packed().in_channels(); })
        .def_property_readonly("groups", [](const PyPackedWeights& p) { return p.packed().groups(); });

    m.def("get_num_threads", &pwcpu::get_num_threads);
    m.def("set_num_threads", &pwcpu::set_num_threads, py::arg("n"));
    m.def("measure_fma_peak_gflops", &pwcpu::measure_fma_peak_gflops, py::arg("threads"), py::arg("seconds"),
          py::call_guard<py::gil_scoped_release>());
    m.def("select_isa", &pwcpu::select_isa, py::arg("name"));
    m.def("active_isa", &pwcpu::active_isa);
    m.def("runtime_info", [] {
        const pwcpu::RuntimeInfo info = pwcpu::runtime_info();
        py::dict d;
        d["isa"] = info.isa;
        d["isa_reason"] = info.isa_reason;
        d["cpu_features"] = info.cpu_features;
        d["supported_isas"] = info.supported_isas;
        d["kernel_main"] = info.kernel_main;
        d["kernel_narrow"] = info.kernel_narrow;
        d["l1d_bytes"] = info.l1d_bytes;
        d["l2_bytes"] = info.l2_bytes;
        d["l3_bytes"] = info.l3_bytes;
        return d;
    });
}
