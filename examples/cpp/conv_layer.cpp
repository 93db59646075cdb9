// Runs one MobileNetV2-style layer through pwcpu's C++ API, prepacked and one-shot, and checks
// both against a plain loop. Exit status 0 when they agree.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <pwcpu/pwcpu.hpp>

int main() {
    const int64_t n = 2, h = 14, w = 13, c = 96, k = 40, stride = 2, pad = 1;
    std::mt19937 gen(42);
    std::normal_distribution<float> normal;
    std::vector<float> x(n * h * w * c), weight(k * c), bias(k);
    for (float& v : x) v = normal(gen);
    for (float& v : weight) v = normal(gen) * 0.1f;
    for (float& v : bias) v = normal(gen);

    const pwcpu::ConvGeometry geometry{stride, stride, pad, pad};
    const int64_t ho = pwcpu::conv_output_size(h, pad, stride), wo = pwcpu::conv_output_size(w, pad, stride);
    std::vector<float> y(n * ho * wo * k), y_once(y.size());
    const pwcpu::TensorView xv{x.data(), {n, h, w, c}, {h * w * c, w * c, c, 1}};
    const pwcpu::TensorView yv{y.data(), {n, ho, wo, k}, {ho * wo * k, wo * k, k, 1}};
    pwcpu::TensorView yv_once = yv;
    yv_once.data = y_once.data();

    // A prepacked layer (weights packed once), and the one-shot call.
    const pwcpu::PackedWeights layer(weight.data(), k, c, c, 1, bias.data(), 1);
    layer.run(xv, yv, nullptr, geometry, pwcpu::Activation::relu);
    pwcpu::conv1x1(xv, weight.data(), bias.data(), yv_once, nullptr, {geometry, 1, pwcpu::Activation::relu});

    double worst = 0.0;
    for (int64_t b = 0; b < n; ++b)
        for (int64_t oh = 0; oh < ho; ++oh)
            for (int64_t ow = 0; ow < wo; ++ow)
                for (int64_t o = 0; o < k; ++o) {
                    const int64_t ih = oh * stride - pad, iw = ow * stride - pad;
                    double acc = bias[o], magnitude = std::fabs(bias[o]);
                    if (ih >= 0 && ih < h && iw >= 0 && iw < w) {
                        for (int64_t i = 0; i < c; ++i) {
                            const double p = double(x[((b * h + ih) * w + iw) * c + i]) * weight[o * c + i];
                            acc += p;
                            magnitude += std::fabs(p);
                        }
                    }
                    const double expected = acc > 0 ? acc : 0.0;
                    const int64_t at = ((b * ho + oh) * wo + ow) * k + o;
                    const double error = std::max(std::fabs(y[at] - expected), std::fabs(y_once[at] - expected));
                    worst = std::max(worst, error / (magnitude * 1e-5 + 1e-30));
                }
    pwcpu::RuntimeInfo info = pwcpu::runtime_info();
    std::printf("pwcpu C++ example: %s kernels, %d threads, worst error %.3g of the bound\n", info.isa.c_str(),
                pwcpu::get_num_threads(), worst);
    return worst <= 1.0 ? 0 : 1;
}
