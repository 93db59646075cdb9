// Runs a statically quantized layer (ONNX QLinearConv semantics: uint8 activations and output,
// int8 weights with per-channel scales) through pwcpu's C++ API and checks every output against
// the exact integer sums requantized as ONNX Runtime does it. Exit status 0 when all agree.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include <pwcpu/pwcpu.hpp>

int main() {
    const int64_t n = 1, h = 9, w = 11, c = 77, k = 30;
    std::mt19937 gen(7);
    std::uniform_int_distribution<int> byte(0, 255), weight_value(-128, 127), bias_value(-5000, 5000);
    std::vector<uint8_t> x(n * h * w * c), y(n * h * w * k);
    std::vector<int8_t> weight(k * c);
    std::vector<float> w_scale(k);
    std::vector<int32_t> w_zero_point(k, 0), bias(k);
    for (uint8_t& v : x) v = static_cast<uint8_t>(byte(gen));
    for (int8_t& v : weight) v = static_cast<int8_t>(weight_value(gen));
    for (int64_t o = 0; o < k; ++o) {
        w_scale[o] = 0.001f * static_cast<float>(1 + o % 7);
        bias[o] = bias_value(gen);
    }

    pwcpu::QuantizedConvParams params;
    params.weight = weight.data();
    params.weight_signed = true;
    params.weight_scale = w_scale.data();
    params.weight_zero_point = w_zero_point.data();
    params.bias = bias.data();
    params.x_scale = 0.02f;
    params.x_zero_point = 128;
    params.y_scale = 0.5f;
    params.y_zero_point = 100;
    const pwcpu::PackedWeights layer(params, k, c, 1);
    const pwcpu::QuantizedView xv{x.data(), {n, h, w, c}, {h * w * c, w * c, c, 1}};
    const pwcpu::QuantizedView yv{y.data(), {n, h, w, k}, {h * w * k, w * k, k, 1}};
    layer.run_quantized(xv, yv, pwcpu::ConvGeometry{});

    int64_t wrong = 0;
    for (int64_t p = 0; p < n * h * w; ++p) {
        for (int64_t o = 0; o < k; ++o) {
            int32_t acc = bias[o];
            for (int64_t i = 0; i < c; ++i) acc += (int32_t{x[p * c + i]} - 128) * int32_t{weight[o * c + i]};
            const float scale = params.x_scale * w_scale[o] / params.y_scale;
            const float scaled = std::clamp(static_cast<float>(acc) * scale, -100.0f, 155.0f);
            const int32_t expected = static_cast<int32_t>(std::nearbyint(scaled)) + 100;
            wrong += y[p * k + o] != expected;
        }
    }
    std::printf("pwcpu C++ static int8 example: %s kernels, %lld of %lld outputs differ from the exact result\n",
                layer.kernel_name(), static_cast<long long>(wrong), static_cast<long long>(y.size()));
    return wrong == 0 ? 0 : 1;
}
