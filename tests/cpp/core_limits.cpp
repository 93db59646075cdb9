// The core's limits, checked through the C++ API (which has no Python boundary in front of it):
// sizes that overflow 64 bits are errors, never wrapped byte counts; more than 2^31 output pixels
// are indexed correctly. Exit status 0 when every check passes.
#include <cstdio>
#include <stdexcept>
#include <vector>

#include <pwcpu/pwcpu.hpp>

namespace {

int failures = 0;

void check(bool ok, const char* what) {
    std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
    failures += ok ? 0 : 1;
}

template <class Exception, class F>
bool throws(F&& f) {
    try {
        f();
    } catch (const Exception&) {
        return true;
    } catch (...) {
        return false;
    }
    return false;
}

}  // namespace

int main() {
    const float one = 1.0f;
    // A broadcast weight (zero strides) of 2^61 - 1 rows: the packed size overflows 64 bits.
    check(throws<std::length_error>([&] { pwcpu::PackedWeights(&one, (int64_t{1} << 61) - 1, 1, 0, 0, nullptr, 1); }),
          "2^61 - 1 output channels: std::length_error");
    check(throws<std::length_error>([&] { pwcpu::PackedWeights(&one, 1, (int64_t{1} << 61) - 1, 0, 0, nullptr, 1); }),
          "2^61 - 1 input channels: std::length_error");
    check(throws<std::length_error>(
              [&] { pwcpu::PackedWeights(&one, 1, (int64_t{1} << 62) - 1, 0, 0, nullptr, 1, pwcpu::Layout::nchw); }),
          "2^62 - 1 input channels, NCHW: std::length_error");
    check(throws<std::bad_alloc>([&] { pwcpu::PackedWeights(&one, int64_t{1} << 40, 1 << 10, 0, 0, nullptr, 1); }),
          "a 4 PiB packing: std::bad_alloc");
    check(throws<std::length_error>([] { pwcpu::conv_output_size(1, int64_t{1} << 62, 1); }),
          "padding 2^62: std::length_error");

    // 2^31 + 2^15 output pixels, read and written through zero-stride batch axes (every image is
    // the same row of 2^15 pixels, so the caller may let the output images share memory).
    const int64_t width = int64_t{1} << 15, images = (int64_t{1} << 16) + 1;
    std::vector<float> x(width), y(width, -1.0f);
    for (int64_t i = 0; i < width; ++i) x[i] = static_cast<float>(i) / static_cast<float>(width);
    const float weight = 2.0f, bias = 0.5f;
    const pwcpu::TensorView xv{x.data(), {images, 1, width, 1}, {0, width, 1, 1}};
    const pwcpu::TensorView yv{y.data(), {images, 1, width, 1}, {0, width, 1, 1}};
    pwcpu::set_num_threads(1);  // every image writes the same memory
    const pwcpu::PackedWeights layer(&weight, 1, 1, 1, 1, &bias, 1);
    layer.run(xv, yv, nullptr, pwcpu::ConvGeometry{}, pwcpu::Activation::none);
    bool exact = true;
    for (int64_t i = 0; i < width; ++i) exact = exact && y[i] == x[i] * 2.0f + 0.5f;
    check(exact, "2^31 + 2^15 output pixels");

    return failures == 0 ? 0 : 1;
}
