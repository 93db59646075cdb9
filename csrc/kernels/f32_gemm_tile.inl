// The f32 GEMM tile microkernel, written once over a vector type.
//
// This file holds no intrinsics. Each ISA's translation unit defines `struct Vec` (its register
// type and a dozen primitive operations) and includes this file *inside its own namespace*, so
// every instantiation is a distinct symbol compiled with that unit's flags: an AVX-512 copy can
// never be picked by the linker for the scalar path.
//
// Vec provides: isa (its name), W (lanes), kRegisters (vector registers), kEmbeddedBroadcast
// (whether an FMA can broadcast an operand from memory), R (register type), set1, load (aligned
// to nothing), load_n/store_n (first n lanes, 0 <= n <= W), store_stream_n (as store_n,
// non-temporal for a whole aligned vector), store, add, sub, mul, div, fma(a, b, c) = a * b + c,
// max(a, b)/min(a, b) with x86 semantics (b is returned when either is NaN, so passing the data
// as b keeps NaN), abs, low_bits_to_exponent (each lane's bits shifted left by 23) and
// select_neg(x, a, b) = x < 0 ? a : b;
// for the shuffled form (below) also dup4(p) (p[0..3] in every group of four lanes) and lane<j>(v)
// (lane j of every group of four, broadcast within the group).
// The ISA's unit includes f32_epilogue.inl (activations) before this file.

// How many of each of a tile's NV vectors' lanes hold its nr valid columns.
template <int NV>
PWCPU_INLINE void valid_lanes(size_t nr, size_t (&lanes)[NV]) {
    for (int v = 0; v < NV; ++v) {
        const size_t first = static_cast<size_t>(v) * Vec::W;
        lanes[v] = nr > first ? (nr - first < Vec::W ? nr - first : Vec::W) : 0;
    }
}

template <int MR, int NV>
PWCPU_INLINE void store_tile(R (&acc)[MR][NV], const GemmTileArgs& p);

// A tile kernel's form beyond its MR x NV shape:
// - half_last (ISAs whose Vec has a Half): the last vector's columns are half a register wide,
//   NR = (NV - 0.5) * W, and their multiply-adds run on half vectors. On a CPU that splits full
//   vectors into halves (Zen 4), 24 columns then cost 24 lanes of work rather than 32.
// - shuffled (NV = 1): with one weight vector per k, every a[m][k] broadcast from memory is a load
//   for each FMA. Half the rows instead load four k at once and broadcast them in registers, which
//   moves work from the load ports to the shuffle units. Where shuffles share a port with the
//   FMAs (Intel's AVX-512 cores) that costs: on an Intel Xeon the plain 14x16 kernel ran at 0.89
//   of the 14x32 one's speed and the shuffled one at 0.68. Both forms are in the tables; the
//   dispatch times them on the CPU at hand (see dispatch.cpp), and they sum in the same order.
enum class TileForm { plain, half_last, shuffled };

// Broadcast a[m][k], multiply by the NR-wide weight row k, accumulate: MR x NV registers stay
// live across the whole K block; the N tail costs nothing here because panels are zero-padded.
template <int MR, int NV, TileForm kForm = TileForm::plain>
void f32_gemm_tile(const GemmTileArgs& p) {
    constexpr int W = Vec::W;
    constexpr bool kHalfLast = kForm == TileForm::half_last;
    static_assert(kForm != TileForm::shuffled || NV == 1, "shuffled broadcasts serve one weight vector per k");
    // Vectors read and written whole; with kHalfLast the last one is read and written as a half.
    constexpr int kWhole = kHalfLast ? NV - 1 : NV;
    // Vec, as a type that depends on the form: its half-vector and shuffle members are looked up
    // only in the kernels that use them (ISAs without such kernels have none).
    using V = std::conditional_t<kForm == TileForm::plain, Vec, Vec>;
    struct Row {
        R v[NV];
    };
    const auto load_row = [](const float* row) {
        Row r;
#pragma GCC unroll 4
        for (int j = 0; j < kWhole; ++j) r.v[j] = Vec::load(row + j * W);
        if constexpr (kHalfLast) r.v[NV - 1] = V::widen(V::Half::load(row + kWhole * W));
        return r;
    };

    R acc[MR][NV];
    if (p.bias != nullptr) {
        const auto b = load_row(p.bias);
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[m][v] = b.v[v];
    } else if (p.row_bias != nullptr) {
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) {
            const R b = Vec::set1(p.row_bias[m]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[m][v] = b;
        }
    } else {
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) {
            const auto partial = load_row(p.partial + m * p.partial_stride);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[m][v] = partial.v[v];
        }
    }

    const float* a[MR];
#pragma GCC unroll 32
    for (int m = 0; m < MR; ++m) a[m] = p.a[m];
    const float* w = static_cast<const float*>(p.w);
    size_t kk = 0;
    // Several k at a time, a row after another, where the registers allow: each row's pointer
    // (most are spilled: a tile has more rows than x86 has free general registers) is loaded once
    // for several broadcasts. One weight vector per k: four k. Wider panels: two k where the
    // accumulators, two k's weight vectors and a broadcast fit the vector registers (AVX-512's
    // 14x32: 28 + 4 of 32, its broadcasts embedded in the FMAs): on an Intel Xeon +0-5 % on deep
    // layers (56x56x256->64 +5 %), where AVX2's 6x16 (12 + 4 + 1 of 16) lost 3-9 %. The sums keep
    // their order.
    constexpr int kTwoStepRegisters = MR * NV + 2 * NV + (Vec::kEmbeddedBroadcast ? 0 : 1);
    constexpr int kSteps = NV == 1 ? 4 : !kHalfLast && kTwoStepRegisters <= Vec::kRegisters ? 2 : 1;
    if constexpr (kSteps > 1) {
        for (; kk + kSteps <= p.kc; kk += kSteps) {
            R b[kSteps][NV];
#pragma GCC unroll 4
            for (int s = 0; s < kSteps; ++s)
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) b[s][v] = Vec::load(w + (s * NV + v) * W);
#pragma GCC unroll 32
            for (int m = 0; m < MR; ++m) {
                if constexpr (kForm == TileForm::shuffled) {
                    if (m % 2 == 0) {
                        const R quad = V::dup4(a[m] + kk);
                        acc[m][0] = Vec::fma(V::template lane<0>(quad), b[0][0], acc[m][0]);
                        acc[m][0] = Vec::fma(V::template lane<1>(quad), b[1][0], acc[m][0]);
                        acc[m][0] = Vec::fma(V::template lane<2>(quad), b[2][0], acc[m][0]);
                        acc[m][0] = Vec::fma(V::template lane<3>(quad), b[3][0], acc[m][0]);
                        continue;
                    }
                }
#pragma GCC unroll 4
                for (int s = 0; s < kSteps; ++s) {
                    const R am = Vec::set1(a[m][kk + s]);
#pragma GCC unroll 4
                    for (int v = 0; v < NV; ++v) acc[m][v] = Vec::fma(am, b[s][v], acc[m][v]);
                }
            }
            w += kSteps * NV * W;
        }
    }
    if constexpr (kHalfLast) {
        using Half = typename V::Half;
        typename Half::R last[MR];
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) last[m] = V::low_half(acc[m][NV - 1]);
        for (; kk < p.kc; ++kk) {
            R b[kWhole];
#pragma GCC unroll 4
            for (int v = 0; v < kWhole; ++v) b[v] = Vec::load(w + v * W);
            const typename Half::R b_last = Half::load(w + kWhole * W);
#pragma GCC unroll 32
            for (int m = 0; m < MR; ++m) {
                const R am = Vec::set1(a[m][kk]);
#pragma GCC unroll 4
                for (int v = 0; v < kWhole; ++v) acc[m][v] = Vec::fma(am, b[v], acc[m][v]);
                last[m] = Half::fma(V::low_half(am), b_last, last[m]);
            }
            w += kWhole * W + Half::W;
        }
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m) acc[m][NV - 1] = V::widen(last[m]);
    } else {
        for (; kk < p.kc; ++kk) {
            R b[NV];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) b[v] = Vec::load(w + v * W);
#pragma GCC unroll 32
            for (int m = 0; m < MR; ++m) {
                const R am = Vec::set1(a[m][kk]);
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) acc[m][v] = Vec::fma(am, b[v], acc[m][v]);
            }
            w += NV * W;
        }
    }

    if (!p.final) {
        constexpr size_t kLastLanes = kHalfLast ? W / 2 : W;
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v)
                Vec::store_n(p.partial + m * p.partial_stride + v * W, acc[m][v], v + 1 == NV ? kLastLanes : W);
        return;
    }
    store_tile<MR, NV>(acc, p);
}

// Whether V rounds to bfloat16 as it stores (ISAs with AVX512-BF16), for bf16 outputs.
template <class V, class = void>
struct StoresBfloat16 : std::false_type {};
template <class V>
struct StoresBfloat16<V, std::void_t<decltype(V::store_bfloat16_n(static_cast<uint16_t*>(nullptr), typename V::R{}, size_t{}))>>
    : std::true_type {};
template <class V>  // (looked up when used: only where V has them)
PWCPU_INLINE void store_bfloat16_lanes(uint16_t* p, typename V::R x, size_t n) {
    V::store_bfloat16_n(p, x, n);
}
template <class V>
PWCPU_INLINE void store_bfloat16_pair_lanes(uint16_t* p, typename V::R low, typename V::R high, size_t n) {
    V::store_bfloat16_pair_n(p, low, high, n);
}

// A final tile's end, for every kernel family: the residual (joining after the sums, so that its
// loads need not wait in front of the k loop), the activation, and the stores.
template <int MR, int NV>
PWCPU_INLINE void store_tile(R (&acc)[MR][NV], const GemmTileArgs& p) {
    constexpr int W = Vec::W;
    size_t lanes[NV];
    valid_lanes(p.nr, lanes);
    if constexpr (StoresBfloat16<Vec>::value) {
        if (p.c_bfloat16 != nullptr) {  // (no residual)
            activate_tile<MR, NV>(acc, p.act);
            // Vectors in pairs: one conversion and one store for two (half as many of each as a
            // vector at a time; on narrow layers they weigh against few multiply-adds).
#pragma GCC unroll 32
            for (int m = 0; m < MR; ++m) {
                uint16_t* const row = p.c_bfloat16[m] + p.col;
#pragma GCC unroll 4
                for (int v = 0; v + 1 < NV; v += 2) {
                    store_bfloat16_pair_lanes<Vec>(row + v * W, acc[m][v], acc[m][v + 1], lanes[v] + lanes[v + 1]);
                }
                if constexpr (NV % 2 == 1) store_bfloat16_lanes<Vec>(row + (NV - 1) * W, acc[m][NV - 1], lanes[NV - 1]);
            }
            return;
        }
    }
    if (p.residual != nullptr) {
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v)
                acc[m][v] = Vec::add(acc[m][v], Vec::load_n(p.residual[m] + p.col + v * W, lanes[v]));
    }
    activate_tile<MR, NV>(acc, p.act);
    if (p.stream) {
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) Vec::store_stream_n(p.c[m] + p.col + v * W, acc[m][v], lanes[v]);
    } else {
#pragma GCC unroll 32
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) Vec::store_n(p.c[m] + p.col + v * W, acc[m][v], lanes[v]);
    }
}

// The kernel for every row count 1..sizeof(R): the table a GemmKernel points to.
template <int NV, TileForm kForm, int... R>
constexpr std::array<GemmTileFn, sizeof...(R)> tiles_by_rows(std::integer_sequence<int, R...>) {
    return {{&f32_gemm_tile<R + 1, NV, kForm>...}};
}

template <int MR, int NV, TileForm kForm = TileForm::plain>
constexpr std::array<GemmTileFn, MR> tiles_by_rows() {
    return tiles_by_rows<NV, kForm>(std::make_integer_sequence<int, MR>{});
}

// "f32_gemm_bias_act_<MR>x<NR>_<isa>" ("bf16_f32_..." for bfloat16 weights), built at compile
// time (no std::string here: library code instantiated in this unit would be compiled with its
// ISA's flags).
using KernelName = std::array<char, 48>;

constexpr int append_text(KernelName& out, int at, const char* text) {
    while (*text != 0) out[at++] = *text++;
    return at;
}

constexpr int append_number(KernelName& out, int at, int value) {
    char digits[12] = {};
    int n = 0;
    do {
        digits[n++] = static_cast<char>('0' + value % 10);
        value /= 10;
    } while (value != 0);
    while (n > 0) out[at++] = digits[--n];
    return at;
}

template <int MR, int NR>
constexpr KernelName gemm_kernel_name(const char* prefix) {
    KernelName out{};
    int at = append_text(out, 0, prefix);
    at = append_number(out, at, MR);
    at = append_text(out, at, "x");
    at = append_number(out, at, NR);
    at = append_text(out, at, "_");
    append_text(out, at, Vec::isa);
    return out;
}

// The GEMM kernel of MR x (NV vectors) tiles: its shape and name follow from the template
// arguments, so they cannot disagree with the code that runs. ("..._shuffled_<MR>x<NR>_<isa>":
// the shuffled form.)
template <int MR, int NV, TileForm kForm = TileForm::plain>
GemmKernel gemm_kernel(float throughput) {
    constexpr int kNr = NV * Vec::W - (kForm == TileForm::half_last ? Vec::W / 2 : 0);
    static constexpr std::array<GemmTileFn, MR> tiles = tiles_by_rows<MR, NV, kForm>();
    static constexpr KernelName name =
        gemm_kernel_name<MR, kNr>(kForm == TileForm::shuffled ? "f32_gemm_bias_act_shuffled_" : "f32_gemm_bias_act_");
    return {tiles.data(), MR, kNr, name.data(), throughput};
}
