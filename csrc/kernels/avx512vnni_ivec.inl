// VNNI's integer vector type for the int8 kernels (see int8_gemm_tile.inl), included inside the
// namespace of each unit with AVX512-VNNI after avx512_vec.inl: the VNNI unit and the AMX unit,
// whose int8 tiles end as the VNNI ones do.

struct IVec {
    static constexpr int kGroup = 4;  // quads of unsigned bytes times int8 weights, summed exactly in int32
    using A = uint8_t;
    using B = int8_t;
    using P = __m512i;
    using I = __m512i;
    static I zero() { return _mm512_setzero_si512(); }
    static P load_groups(const int8_t* p) { return _mm512_loadu_si512(p); }
    static P broadcast_group(const uint8_t* p) {
        int32_t quad;
        std::memcpy(&quad, p, sizeof quad);
        return _mm512_set1_epi32(quad);
    }
    // acc plus, per lane, the four products of a's unsigned bytes and b's signed ones. Written as
    // the instruction: through the intrinsic GCC 12 keeps a copy of every accumulator on the stack
    // and moves it back into a register each step (measured: 1.6-1.8x fp32's speed instead of 2.5-3x).
    static I madd_add(I acc, P a, P b) {
        __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
        return acc;
    }
    static __m512 to_float(I x) { return _mm512_cvtepi32_ps(x); }
    static I set1(int32_t x) { return _mm512_set1_epi32(x); }
    static I add(I a, I b) { return _mm512_add_epi32(a, b); }
    static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
    static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
    static I load_i32(const int32_t* p) { return _mm512_loadu_si512(p); }
    static I round(__m512 x) { return _mm512_cvtps_epi32(x); }
    static void store_bytes(uint8_t* p, I x, size_t n, bool is_signed) {
        const __m128i bytes = is_signed ? _mm512_cvtsepi32_epi8(x) : _mm512_cvtusepi32_epi8(x);
        _mm_mask_storeu_epi8(p, Vec::mask(n), bytes);
    }
};
