// The memory-bound NHWC operations a converted model runs between its convolutions: ShuffleNet's
// channel shuffle and global average pooling. Each is one pass over the activations, threaded when
// they are large.
#include <algorithm>

#include "pwcpu/pwcpu.hpp"
#include "runtime/threads.hpp"

namespace pwcpu {

void interleave_channels(const TensorView* sources, int count, float* dst) {
    const int64_t h = sources[0].shape[1], w = sources[0].shape[2], c = sources[0].shape[3];
    const int64_t rows = sources[0].shape[0] * h, pixel_floats = c * count;
    if (rows == 0 || w == 0 || c == 0) return;
    bool pairs = count == 2;  // two sources with contiguous channels: one vectorized interleave
    for (int g = 0; g < count; ++g) pairs = pairs && (c == 1 || sources[g].strides[3] == 1);
    const int threads = runtime::region_threads(rows * w * pixel_floats > (1 << 16) ? get_num_threads() : 1);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r / h, y = r % h;
        for (int64_t p = 0; p < w; ++p) {
            float* __restrict to = dst + (r * w + p) * pixel_floats;
            const auto pixel = [&](int g) {
                const TensorView& s = sources[g];
                return s.data + n * s.strides[0] + y * s.strides[1] + p * s.strides[2];
            };
            if (pairs) {
                const float* __restrict a = pixel(0);
                const float* __restrict b = pixel(1);
                for (int64_t i = 0; i < c; ++i) {
                    to[2 * i] = a[i];
                    to[2 * i + 1] = b[i];
                }
                continue;
            }
            for (int g = 0; g < count; ++g) {
                const float* from = pixel(g);
                for (int64_t i = 0; i < c; ++i) to[i * count + g] = from[i * sources[g].strides[3]];
            }
        }
    }
}

void channel_means(const TensorView& x, float* out) {
    const int64_t n_images = x.shape[0], h = x.shape[1], w = x.shape[2], c = x.shape[3];
    if (n_images == 0 || c == 0) return;
    const double pixels = static_cast<double>(h * w);
    // Blocks of channels per image, so that large maps split among threads; each pixel row is
    // summed in float (w terms) and the rows in double, which keeps large maps accurate.
    constexpr int64_t kBlock = 256;
    const int64_t blocks = (c + kBlock - 1) / kBlock, tasks = n_images * blocks;
    const int threads = runtime::region_threads(n_images * h * w * c > (1 << 18) ? get_num_threads() : 1);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t n = task / blocks, c0 = (task % blocks) * kBlock, width = std::min(kBlock, c - c0);
        double total[kBlock] = {};
        float row[kBlock];
        for (int64_t y = 0; y < h; ++y) {
            std::fill(row, row + width, 0.0f);
            for (int64_t p = 0; p < w; ++p) {
                const float* from = x.data + n * x.strides[0] + y * x.strides[1] + p * x.strides[2] + c0 * x.strides[3];
                if (x.strides[3] == 1) {
                    for (int64_t i = 0; i < width; ++i) row[i] += from[i];
                } else {
                    for (int64_t i = 0; i < width; ++i) row[i] += from[i * x.strides[3]];
                }
            }
            for (int64_t i = 0; i < width; ++i) total[i] += row[i];
        }
        for (int64_t i = 0; i < width; ++i) out[n * c + c0 + i] = static_cast<float>(total[i] / pixels);
    }
}

}  // namespace pwcpu
