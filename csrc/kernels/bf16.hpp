// bfloat16 rounding: of the weights when they are packed, and of activations as the kernels read them.
#pragma once
#include <cstdint>
#include <cstring>

namespace pwcpu::kernels {

// x rounded to the nearest bfloat16 (ties to even) and kept as a float: the value a bf16 store
// and load give back. NaN stays NaN (quieted, sign kept), infinities stay, and values beyond the
// largest bf16 become infinities, as in every float32 -> bfloat16 conversion (ml_dtypes, PyTorch).
// Internal linkage: each ISA's unit compiles (and vectorises) its own copy with its own flags.
static inline float round_to_bf16(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    const uint32_t quiet_nan = (bits | 0x00400000u) & 0xffff0000u;
    const uint32_t result = (bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
    float y;
    std::memcpy(&y, &result, sizeof y);
    return y;
}

}  // namespace pwcpu::kernels
