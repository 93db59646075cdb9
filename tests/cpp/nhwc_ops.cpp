// pwcpu::interleave_channels and pwcpu::channel_means through the C++ API, against plain loops:
// NHWC views with padded pixel rows and channel slices, one and two threads. Exit status 0 when
// every check passes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <pwcpu/pwcpu.hpp>

namespace {

int failures = 0;

void check(bool ok, const char* what) {
    std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
    failures += ok ? 0 : 1;
}

// An NHWC view of n x h x w x c inside `memory`, each pixel `pixel_stride` floats apart (>= c:
// a channel slice of a wider tensor), each row `row_pad` floats longer than its pixels.
pwcpu::TensorView view_in(std::vector<float>& memory, int64_t n, int64_t h, int64_t w, int64_t c, int64_t pixel_stride,
                          int64_t row_pad) {
    const int64_t row = w * pixel_stride + row_pad, image = h * row;
    memory.resize(static_cast<size_t>(n * image));
    for (size_t i = 0; i < memory.size(); ++i) memory[i] = static_cast<float>((i * 7919) % 1000) / 100.0f - 5.0f;
    return pwcpu::TensorView{memory.data(), {n, h, w, c}, {image, row, pixel_stride, 1}};
}

float at(const pwcpu::TensorView& v, int64_t n, int64_t y, int64_t x, int64_t ch) {
    return v.data[n * v.strides[0] + y * v.strides[1] + x * v.strides[2] + ch * v.strides[3]];
}

}  // namespace

int main() {
    for (int threads : {1, 2}) {
        pwcpu::set_num_threads(threads);
        for (int count : {1, 2, 3}) {
            const int64_t n = 2, h = 37, w = 29, c = 53;  // large enough to be split among threads
            std::vector<std::vector<float>> memories(static_cast<size_t>(count));
            std::vector<pwcpu::TensorView> sources;
            for (int g = 0; g < count; ++g) sources.push_back(view_in(memories[g], n, h, w, c, c + 3 * g, g));
            std::vector<float> out(static_cast<size_t>(n * h * w * c * count), NAN);
            pwcpu::interleave_channels(sources.data(), count, out.data());
            bool exact = true;
            for (int64_t i = 0; i < n * h * w; ++i) {
                for (int64_t ch = 0; ch < c; ++ch) {
                    for (int g = 0; g < count; ++g) {
                        const float expected = at(sources[g], i / (h * w), i / w % h, i % w, ch);
                        exact = exact && out[static_cast<size_t>((i * c + ch) * count + g)] == expected;
                    }
                }
            }
            std::printf("%d thread(s), %d source(s): ", threads, count);
            check(exact, "interleave_channels equals the plain loop");
        }
        for (int64_t c : {1, 7, 256, 300}) {
            std::vector<float> memory;
            const int64_t n = 3, h = 41, w = 43;
            const pwcpu::TensorView x = view_in(memory, n, h, w, c, c + 5, 2);
            std::vector<float> means(static_cast<size_t>(n * c), NAN);
            pwcpu::channel_means(x, means.data());
            bool close = true;
            for (int64_t i = 0; i < n; ++i) {
                for (int64_t ch = 0; ch < c; ++ch) {
                    double sum = 0.0;
                    for (int64_t y = 0; y < h; ++y) {
                        for (int64_t p = 0; p < w; ++p) sum += at(x, i, y, p, ch);
                    }
                    const double expected = sum / static_cast<double>(h * w);
                    close = close && std::fabs(means[static_cast<size_t>(i * c + ch)] - expected) <= 1e-6 * (1.0 + std::fabs(expected));
                }
            }
            std::printf("%d thread(s), %lld channels: ", threads, static_cast<long long>(c));
            check(close, "channel_means equals the float64 mean");
        }
    }
    return failures == 0 ? 0 : 1;
}
