// Portable microkernels: plain C++ over small fixed-size arrays, which the compiler may
// auto-vectorise for the baseline target. Runs on every CPU; every test can force it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <array>
#include <utility>

#include "kernels/bf16.hpp"
#include "kernels/ukernel.hpp"

namespace pwcpu::kernels {
namespace scalar {

struct Vec {
    static constexpr char isa[] = "scalar";
    static constexpr int W = 4;
    static constexpr int kRegisters = 16;  // (what the compiler has for them: xmm0-15)
    static constexpr bool kEmbeddedBroadcast = false;
    struct R {
        float lane[W];
    };
    template <class F>
    static R map(F f) {
        R r;
        for (int i = 0; i < W; ++i) r.lane[i] = f(i);
        return r;
    }
    static R set1(float x) { return map([&](int) { return x; }); }
    static R load(const float* p) { return map([&](int i) { return p[i]; }); }
    static void keep_in_register(R&) {}  // (the column form it serves runs on the SIMD units only)
    static R load_n(const float* p, size_t n) {
        return map([&](int i) { return static_cast<size_t>(i) < n ? p[i] : 0.0f; });
    }
    static void store_n(float* p, R x, size_t n) {
        for (size_t i = 0; i < n; ++i) p[i] = x.lane[i];
    }
    static void store_stream_n(float* p, R x, size_t n) { store_n(p, x, n); }  // no portable non-temporal store
    static R add(R a, R b) { return map([&](int i) { return a.lane[i] + b.lane[i]; }); }
    static R sub(R a, R b) { return map([&](int i) { return a.lane[i] - b.lane[i]; }); }
    static R mul(R a, R b) { return map([&](int i) { return a.lane[i] * b.lane[i]; }); }
    static R div(R a, R b) { return map([&](int i) { return a.lane[i] / b.lane[i]; }); }
    // Multiply-add in two roundings, as the baseline target has no FMA instruction.
    static R fma(R a, R b, R c) { return map([&](int i) { return a.lane[i] * b.lane[i] + c.lane[i]; }); }
    static R max(R a, R b) { return map([&](int i) { return a.lane[i] > b.lane[i] ? a.lane[i] : b.lane[i]; }); }
    static R min(R a, R b) { return map([&](int i) { return a.lane[i] < b.lane[i] ? a.lane[i] : b.lane[i]; }); }
    static R abs(R a) { return map([&](int i) { return std::fabs(a.lane[i]); }); }
    static R low_bits_to_exponent(R a) {
        return map([&](int i) {
            uint32_t bits;
            std::memcpy(&bits, &a.lane[i], sizeof bits);
            bits <<= 23;
            float shifted;
            std::memcpy(&shifted, &bits, sizeof bits);
            return shifted;
        });
    }
    static R select_neg(R x, R a, R b) { return map([&](int i) { return x.lane[i] < 0.0f ? a.lane[i] : b.lane[i]; }); }
    static float reduce_min(R x) {
        float m = x.lane[0];
        for (float v : x.lane) m = v < m ? v : m;
        return m;
    }
    static float reduce_max(R x) {
        float m = x.lane[0];
        for (float v : x.lane) m = v > m ? v : m;
        return m;
    }
    static float reduce_add(R x) {
        float sum = 0.0f;
        for (float v : x.lane) sum += v;
        return sum;
    }
};

struct IVec {
    static constexpr int kGroup = 2;  // pairs of int16, summed exactly in int32
    using A = int16_t;
    using B = int16_t;
    struct P {
        int16_t v[2 * Vec::W];
    };
    struct I {
        int32_t lane[Vec::W];
    };
    static I zero() { return I{}; }
    static P load_groups(const int16_t* p) {
        P r;
        std::memcpy(r.v, p, sizeof r.v);
        return r;
    }
    static P broadcast_group(const int16_t* p) {
        P r;
        for (int i = 0; i < Vec::W; ++i) {
            r.v[2 * i] = p[0];
            r.v[2 * i + 1] = p[1];
        }
        return r;
    }
    static I madd_add(I acc, P a, P b) {
        for (int i = 0; i < Vec::W; ++i) {
            acc.lane[i] += int32_t{a.v[2 * i]} * b.v[2 * i] + int32_t{a.v[2 * i + 1]} * b.v[2 * i + 1];
        }
        return acc;
    }
    static Vec::R to_float(I x) { return Vec::map([&](int i) { return static_cast<float>(x.lane[i]); }); }
    static I set1(int32_t x) {
        I r;
        for (int32_t& lane : r.lane) lane = x;
        return r;
    }
    static I add(I a, I b) {
        for (int i = 0; i < Vec::W; ++i) a.lane[i] += b.lane[i];
        return a;
    }
    static I load_i32(const int32_t* p) {
        I r;
        std::memcpy(r.lane, p, sizeof r.lane);
        return r;
    }
    static I round(Vec::R x) {  // to nearest even: the default rounding mode
        I r;
        for (int i = 0; i < Vec::W; ++i) r.lane[i] = static_cast<int32_t>(std::nearbyint(x.lane[i]));
        return r;
    }
    static void store_int16(int16_t* p, I x, size_t n) {  // the values fit
        for (size_t i = 0; i < n; ++i) p[i] = static_cast<int16_t>(x.lane[i]);
    }
    static void store_bytes(uint8_t* p, I x, size_t n, bool is_signed) {
        for (size_t i = 0; i < n; ++i) {
            p[i] = is_signed ? static_cast<uint8_t>(static_cast<int8_t>(x.lane[i])) : static_cast<uint8_t>(x.lane[i]);
        }
    }
};

#include "kernels/f32_epilogue.inl"
#include "kernels/f32_gemm_tile.inl"
#include "kernels/fma_probe.inl"
#include "kernels/grouped_dot.inl"
#include "kernels/int8_gemm_tile.inl"
#include "kernels/f32_dwconv.inl"
#include "kernels/bf16_round.inl"

}  // namespace scalar

const IsaKernels& scalar_kernels() {
    static const IsaKernels table{
        "scalar",
        {scalar::gemm_kernel<4, 2>(1.0f), scalar::gemm_kernel<4, 1>(0.8f)},
        {},
        {scalar::int8_gemm_kernel<4, 2>(1.0f)},
        scalar::quantize_rows_int8,
        scalar::widen_row_int8,
        "scalar",
        nullptr,
        {scalar::f32_dwconv_row, scalar::Vec::W, "f32_dwconv_bias_act_scalar"},
        scalar::round_to_bf16_run,
        nullptr,
        scalar::fma_peak_probe,
        scalar::kFmaChains * scalar::Vec::W,
    };
    return table;
}

}  // namespace pwcpu::kernels
