// The AVX-512 vector type the kernels are written over (see f32_gemm_tile.inl), included inside
// each AVX-512 unit's namespace: the AVX-512F unit and the units of its extensions share it, each
// naming itself (its kernels' names end in it) by kUnitIsa, defined before the include.

// Half a vector (8 lanes): the last columns of kernels whose panels are a vector and a half wide
// (see f32_gemm_tile.inl).
struct HalfVec {
    static constexpr int W = 8;
    using R = __m256;
    static R load(const float* p) { return _mm256_loadu_ps(p); }
    static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
};

struct Vec {
    static constexpr const char* isa = kUnitIsa;
    static constexpr int W = 16;
    static constexpr int kRegisters = 32;  // zmm0-31
    static constexpr bool kEmbeddedBroadcast = true;  // an FMA broadcasts its operand from memory
    using R = __m512;
    static __mmask16 mask(size_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
    static R set1(float x) { return _mm512_set1_ps(x); }
    static R load(const float* p) { return _mm512_loadu_ps(p); }
    static R load_n(const float* p, size_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
    // Keeps a loaded vector in a register for all its uses: GCC otherwise folds the load into each
    // FMA that uses it, reading it again per use (the depthwise column form: 24 loads per filter row
    // instead of 10; 1.13-1.47x on 3x3 stride-1 layers on Zen 4).
    static void keep_in_register(R& x) { asm("" : "+v"(x)); }
    using Half = HalfVec;
    // (Shuffles the compiler sees through, where GCC 12's cast intrinsics warn in its own headers.)
    static Half::R low_half(R x) { return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7); }
    static R widen(Half::R x) {  // the upper lanes zero
        return __builtin_shufflevector(x, _mm256_setzero_ps(), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    }
    static void store_n(float* p, R x, size_t n) { _mm512_mask_storeu_ps(p, mask(n), x); }
#if defined(__AVX512BF16__)
    // The first n lanes rounded to bfloat16 (to nearest even, NaN quieted, as round_to_bf16).
    static void store_bfloat16_n(uint16_t* p, R x, size_t n) {
        _mm256_mask_storeu_epi16(p, mask(n), (__m256i)_mm512_cvtneps_pbh(x));
    }
    // The first n of 2W lanes (low's, then high's) likewise, in one conversion and one store.
    static void store_bfloat16_pair_n(uint16_t* p, R low, R high, size_t n) {
        const __mmask32 lanes = n >= 2 * W ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
        _mm512_mask_storeu_epi16(p, lanes, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
#endif
    static void store_stream_n(float* p, R x, size_t n) {
        if (n == W && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
            _mm512_stream_ps(p, x);  // a whole cache line
        } else {
            store_n(p, x, n);
        }
    }
    static R add(R a, R b) { return _mm512_add_ps(a, b); }
    static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
    static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
    static R div(R a, R b) { return _mm512_div_ps(a, b); }
    static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
    static R max(R a, R b) { return _mm512_max_ps(a, b); }
    static R min(R a, R b) { return _mm512_min_ps(a, b); }
    static R abs(R a) { return _mm512_abs_ps(a); }
    static R low_bits_to_exponent(R a) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(a), 23)); }
    static R dup4(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
    template <int J>
    static R lane(R v) { return _mm512_permute_ps(v, J * 0x55); }
    static R select_neg(R x, R a, R b) {
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), b, a);
    }
    // Across the 16 lanes (in a fixed order: results are the same every call).
    static float reduce_min(R x) { return _mm512_reduce_min_ps(x); }
    static float reduce_max(R x) { return _mm512_reduce_max_ps(x); }
    static float reduce_add(R x) { return _mm512_reduce_add_ps(x); }
};
