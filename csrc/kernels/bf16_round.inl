// Rounding a run of activations to bfloat16 (kernels/bf16.hpp), included inside each ISA's
// namespace so that the loop is vectorised with that unit's registers (8 or 16 lanes).

// dst[i] = round_to_bf16(src[i]) for i < n; dst may be src.
void round_to_bf16_run(const float* src, float* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = round_to_bf16(src[i]);
}
