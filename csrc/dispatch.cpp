#include "dispatch.hpp"
#include "runtime/memory.hpp"
#include "runtime/timed_choice.hpp"

#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace pwcpu {
namespace detail {
namespace {

// Kernel families (Precision order: fp32, bf16, int8), as bits.
constexpr int kFamilies = 3;
constexpr unsigned kEveryFamily = (1u << kFamilies) - 1u;
constexpr unsigned family_bit(Precision family) { return 1u << static_cast<int>(family); }

constexpr size_t kMaxIsas = 8;

struct IsaEntry {
    const char* name;
    const kernels::IsaKernels& (*table)();
    bool (*cpu_has)();
    unsigned families;  // the families with kernels of this ISA's own; the others use the next ISA down's
};

bool avx512_vnni() {
    return __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("avx512bw") != 0 &&
           __builtin_cpu_supports("avx512vl") != 0 && __builtin_cpu_supports("avx512vnni") != 0;
}

bool avx512_bf16() { return avx512_vnni() && __builtin_cpu_supports("avx512bf16") != 0; }

#if defined(PWCPU_HAVE_AMX_KERNELS)
// AMX's tile data (8 KiB of state per thread) is off until a process asks Linux for it; asked once.
bool amx() {
    static const bool usable = [] {
        if (!avx512_bf16() || __builtin_cpu_supports("amx-tile") == 0 || __builtin_cpu_supports("amx-bf16") == 0 ||
            __builtin_cpu_supports("amx-int8") == 0) {
            return false;
        }
#if defined(__linux__)
        constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
        constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
        return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
        return false;
#endif
    }();
    return usable;
}
#endif

// Best first, each ISA's CPU features including those of every ISA below it. An ISA is usable
// only when it was compiled in *and* the CPU (and OS, which __builtin_cpu_supports checks through
// XGETBV) supports it.
const std::vector<IsaEntry>& known_isas() {
    static const std::vector<IsaEntry> isas{
#if defined(PWCPU_HAVE_AMX_KERNELS)
        {"avx512amx", kernels::avx512amx_kernels, amx, family_bit(Precision::bf16) | family_bit(Precision::int8)},
#endif
#if defined(PWCPU_HAVE_X86_KERNELS)
        {"avx512bf16", kernels::avx512bf16_kernels, avx512_bf16, family_bit(Precision::bf16)},
        {"avx512vnni", kernels::avx512vnni_kernels, avx512_vnni, family_bit(Precision::int8)},
        {"avx512", kernels::avx512_kernels, [] { return __builtin_cpu_supports("avx512f") != 0; }, kEveryFamily},
        {"avx2", kernels::avx2_kernels,
         [] { return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0; }, kEveryFamily},
#endif
        {"scalar", kernels::scalar_kernels, [] { return true; }, kEveryFamily},
    };
    return isas;
}

// Times GEMM kernels on full tiles of a reduction of 256 laid out as the driver lays them out
// (panels on cache lines: a vector load that straddles two lines costs Zen 4 about a third of the
// 256-bit kernels' speed): seconds per multiply-add lane, for kernels that read float32 rows and
// for kernels that read converted ones (16-bit pairs, bytes).
class TileTimer {
public:
    static constexpr size_t kReduction = 256;
    static constexpr int kCalls = 48;

    TileTimer() {
        const char* what = "kernel timing";
        a_ = runtime::allocate_floats(kMaxRows * kReduction, what);
        panel_ = runtime::allocate_floats(kMaxColumns * (kReduction + 3), what);
        c_ = runtime::allocate_floats(kMaxRows * kMaxColumns, what);
        std::fill_n(a_.get(), kMaxRows * kReduction, 1e-3f);
        std::fill_n(panel_.get(), kMaxColumns * (kReduction + 3), 1e-3f);
        for (size_t m = 0; m < kMaxRows; ++m) {
            a_rows_[m] = a_.get() + m * kReduction;
            converted_rows_[m] = a_rows_[m];  // small values as floats, as int16 pairs and as bytes
            c_rows_[m] = c_.get() + m * kMaxColumns;
        }
    }

    double seconds_per_lane(const kernels::GemmKernel& k) {
        if (static_cast<size_t>(k.mr) > kMaxRows || static_cast<size_t>(k.nr) > kMaxColumns) {
            throw std::logic_error("TileTimer: a kernel larger than its buffers");
        }
        kernels::GemmTileArgs args{};
        args.a = a_rows_;
        args.a_converted = converted_rows_;
        args.a_converted_stride = kReduction * sizeof(float);
        args.c = c_rows_;
        args.bias = panel_.get();
        args.w = panel_.get() + (k.converts() ? 3 : 1) * k.nr;
        args.kc = kReduction;
        args.nr = static_cast<size_t>(k.nr);
        args.final = true;
        args.act = Activation::none;
        const kernels::GemmTileFn tile = k.by_rows[k.mr - 1];
        const kernels::ThreadSetup thread_setup(k);
        tile(args);  // warm up
        const auto start = std::chrono::steady_clock::now();
        for (int call = 0; call < kCalls; ++call) tile(args);
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        return seconds / (static_cast<double>(kCalls) * k.mr * k.nr * kReduction);
    }

private:
    static constexpr size_t kMaxRows = 32, kMaxColumns = 64;
    runtime::AlignedBuffer a_, panel_, c_;
    const float* a_rows_[kMaxRows];
    const void* converted_rows_[kMaxRows];
    float* c_rows_[kMaxRows];
};

// The median over kRounds of f(), each round's value a ratio of two timings made back to back:
// robust to a slow phase of the machine (which slows a whole round) and to a round a neighbour
// interrupts.
template <class F>
double median_of_rounds(F&& f) {
    constexpr int kRounds = 15;
    std::vector<double> values;
    for (int round = 0; round < kRounds; ++round) values.push_back(f());
    std::nth_element(values.begin(), values.begin() + kRounds / 2, values.end());
    return values[kRounds / 2];
}

// Each fp32 GEMM kernel of `gemm`'s speed per multiply-add lane relative to the first (main) one.
std::vector<double> relative_speeds(const kernels::IsaKernels::GemmKernels& gemm) {
    TileTimer timer;
    std::vector<double> speeds(gemm.size(), 1.0);
    for (size_t i = 1; i < gemm.size(); ++i) {
        if (gemm[i].by_rows == nullptr) continue;
        speeds[i] = median_of_rounds([&] { return timer.seconds_per_lane(gemm[0]) / timer.seconds_per_lane(gemm[i]); });
    }
    return speeds;
}

// Whether `name` is in PWCPU_SKIP_KERNELS, a comma-separated list of kernel names the dispatch
// leaves out (to compare kernels, or to run one the timing would not pick; the tests do).
bool skipped_kernel(const char* name) {
    const char* list = std::getenv("PWCPU_SKIP_KERNELS");
    if (list == nullptr) return false;
    const std::string names = std::string(",") + list + ",";
    return names.find(std::string(",") + name + ",") != std::string::npos;
}

// Entry i's table as the dispatch hands it out. Where it serves fp32, its fp32 GEMM kernels'
// relative speeds are timed on this CPU (unless PWCPU_KERNEL_TIMING=0), for they differ between
// machines: AMD Zen 4 runs a 512-bit FMA as two 256-bit halves, so the 14x24 kernel, whose last
// 8 columns are a half vector, does 24 columns at 0.93 of the 14x32 one's speed per column; on
// CPUs with full-width units it does them at the cost of 32. A layer's kernel follows from them.
// Kernels no layer width would take are dropped, so runtime_info lists what can run. Every kernel
// computes the same sums in the same order: the choice changes speed, never results.
const kernels::IsaKernels& usable_table(size_t entry) {
    static std::once_flag once[kMaxIsas];
    static kernels::IsaKernels tables[kMaxIsas];
    if (entry >= kMaxIsas) throw std::logic_error("usable_table: too many ISAs");
    std::call_once(once[entry], [entry] {
        kernels::IsaKernels table = known_isas()[entry].table();
        // (Never the main kernel: NCHW layers and the timing's reference need it.)
        for (size_t i = 1; i < table.gemm.size(); ++i) {
            if (table.gemm[i].by_rows != nullptr && skipped_kernel(table.gemm[i].name)) table.gemm[i] = kernels::GemmKernel{};
        }
        const char* timing = std::getenv("PWCPU_KERNEL_TIMING");
        const bool serves_fp32 = (known_isas()[entry].families & family_bit(Precision::fp32)) != 0;
        if (serves_fp32 && (timing == nullptr || std::string(timing) != "0")) {
            // No kernel is rated above the main one: a narrower panel has each tile's activations
            // read once more per panel, which a single tile's timing does not see (on Zen 4, 14x16
            // times as fast as 14x32 but runs C = 2048 layers 4 % slower).
            const std::vector<double> speeds = relative_speeds(table.gemm);
            for (size_t i = 0; i < table.gemm.size(); ++i) {
                if (table.gemm[i].by_rows != nullptr) table.gemm[i].throughput = static_cast<float>(std::min(1.0, speeds[i]));
            }
        }
        int widest = 0;
        for (const kernels::GemmKernel& k : table.gemm) widest = std::max(widest, k.nr);
        std::vector<bool> taken(table.gemm.size(), false);
        taken[0] = true;  // the main kernel (NCHW layers use it)
        for (int columns = 1; columns <= 3 * widest; ++columns) {
            taken[static_cast<size_t>(&table.gemm_for(columns) - table.gemm.data())] = true;
        }
        size_t kept = 0;
        for (size_t i = 0; i < table.gemm.size(); ++i) {
            if (taken[i]) table.gemm[kept++] = table.gemm[i];
        }
        std::fill(table.gemm.begin() + static_cast<ptrdiff_t>(kept), table.gemm.end(), kernels::GemmKernel{});
        tables[entry] = table;
    });
    return tables[entry];
}

struct Selection {
    const kernels::IsaKernels* kernels = nullptr;
    std::string reason;
};

// One selection per kernel family, each with its override.
constexpr const char* kFamilyOverride[kFamilies] = {"PWCPU_ISA", "PWCPU_BF16_ISA", "PWCPU_INT8_ISA"};

std::mutex selection_mutex;
std::atomic<const kernels::IsaKernels*> selected[kFamilies] = {};
std::string selection_reason[kFamilies];

// Whether entry j's bf16 kernels (vdpbf16ps pairs) run slower than the float32 kernels on rounded
// weights that the next ISA down would run for bf16. They are twice the FMA rate on AMD Zen 4
// (1.9x), but Intel's Sapphire Rapids runs vdpbf16ps at a quarter of its FMA rate (0.52-0.77x
// measured with AMX's tiles set aside): the automatic choice times the two, once per process, on
// CPUs where it is to be made. (Where AMX is usable, its tiles are chosen before.)
bool own_bf16_kernels_are_slower(size_t j) {
    const auto& isas = known_isas();
    const unsigned bit = family_bit(Precision::bf16);
    size_t below = j + 1;
    while (below < isas.size() && (isas[below].families & bit) == 0) ++below;
    if (below >= isas.size()) return false;
    const kernels::IsaKernels& own = usable_table(j);
    const kernels::IsaKernels& fallback = usable_table(below);
    if (!own.gemm_of(Precision::bf16)[0].converts() || fallback.gemm_of(Precision::bf16)[0].converts()) return false;
    static std::once_flag once[kMaxIsas];
    static bool slower[kMaxIsas];
    std::call_once(once[j], [&] {
        TileTimer timer;
        const kernels::GemmKernel& dot = own.gemm_of(Precision::bf16)[0];
        const kernels::GemmKernel& float32 = fallback.gemm_of(Precision::bf16)[0];
        slower[j] = median_of_rounds([&] { return timer.seconds_per_lane(dot) / timer.seconds_per_lane(float32); }) > 1.0;
    });
    return slower[j];
}

// The kernels of `family` at the ISA `requested` names (empty or "auto": the best the CPU supports):
// that ISA's own, or where it has none of the family's, the next ISA down's.
Selection choose(const std::string& requested, const char* source, int family) {
    const auto& isas = known_isas();
    const unsigned bit = 1u << family;
    const bool automatic = requested.empty() || requested == "auto";
    for (size_t i = 0; i < isas.size(); ++i) {
        if (!automatic && requested != isas[i].name) continue;
        if (!isas[i].cpu_has()) {
            if (automatic) continue;
            throw std::invalid_argument(std::string(source) + " asks for ISA '" + requested +
                                        "', which this CPU does not support");
        }
        size_t j = i;
        while ((isas[j].families & bit) == 0) ++j;  // scalar serves every family
        if (automatic && family == static_cast<int>(Precision::bf16) && own_bf16_kernels_are_slower(j)) {
            size_t below = j + 1;
            while ((isas[below].families & bit) == 0) ++below;
            return {&usable_table(below), "best ISA this CPU supports, less " + std::string(isas[j].name) +
                                              ", whose bf16 kernels timed slower here than the float32 ones on rounded weights"};
        }
        return {&usable_table(j), automatic ? std::string("best ISA this CPU supports") : std::string("requested by ") + source};
    }
    std::string names;
    for (const auto& isa : known_isas()) names += std::string(names.empty() ? "" : ", ") + isa.name;
    throw std::invalid_argument(std::string(source) + " = '" + requested +
                                "' is not a known ISA; expected one of: auto, " + names);
}

int64_t sysfs_cache_size(int level, const char* type) {
    for (int index = 0; index < 8; ++index) {
        const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
        std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
        int found_level = 0;
        std::string found_type, size;
        if (!(level_file >> found_level) || !(type_file >> found_type) || !(size_file >> size)) continue;
        if (found_level != level || (found_type != type && found_type != "Unified")) continue;
        int64_t bytes = std::strtoll(size.c_str(), nullptr, 10);
        if (!size.empty() && (size.back() == 'K')) bytes *= 1024;
        if (!size.empty() && (size.back() == 'M')) bytes *= 1024 * 1024;
        return bytes;
    }
    return 0;
}

// The kernel's view (sysfs) first: under some hypervisors glibc's CPUID-based sysconf misreports.
int64_t cache_size(int sysconf_name, int level, const char* type, int64_t fallback) {
    int64_t bytes = sysfs_cache_size(level, type);
    if (bytes <= 0) bytes = sysconf(sysconf_name);
    return bytes > 0 ? bytes : fallback;
}

}  // namespace

const kernels::IsaKernels& active_kernels() {
    const kernels::IsaKernels* current = selected[0].load(std::memory_order_acquire);
    if (current != nullptr) return *current;
    std::lock_guard<std::mutex> lock(selection_mutex);
    current = selected[0].load(std::memory_order_relaxed);
    if (current == nullptr) {
        // fp32 from PWCPU_ISA (or the CPU); bf16 and int8 from their own variable where it is set,
        // else as fp32. Every variable is checked now, so a bad one is an error at import.
        Selection chosen[kFamilies];
        std::string requested[kFamilies];
        bool set[kFamilies];
        for (int f = 0; f < kFamilies; ++f) {
            const char* env = std::getenv(kFamilyOverride[f]);
            requested[f] = env != nullptr ? env : "";
            set[f] = !requested[f].empty() && requested[f] != "auto";
        }
        for (int f = 0; f < kFamilies; ++f) {
            const int from = set[f] ? f : 0;
            chosen[f] = choose(set[from] ? requested[from] : "", kFamilyOverride[from], f);
            if (!set[from]) chosen[f].reason += " (PWCPU_ISA not set)";
        }
        for (int f = kFamilies - 1; f >= 0; --f) {  // fp32 last: it marks the choice as made
            selection_reason[f] = chosen[f].reason;
            selected[f].store(chosen[f].kernels, std::memory_order_release);
        }
        current = chosen[0].kernels;
    }
    return *current;
}

const kernels::IsaKernels& family_kernels(Precision precision) {
    const kernels::IsaKernels& fp32 = active_kernels();
    if (precision == Precision::fp32) return fp32;
    return *selected[static_cast<int>(precision)].load(std::memory_order_acquire);
}

const CacheSizes& cache_sizes() {
    static const CacheSizes sizes{
        cache_size(_SC_LEVEL1_DCACHE_SIZE, 1, "Data", 32 * 1024),
        cache_size(_SC_LEVEL2_CACHE_SIZE, 2, "Unified", 1024 * 1024),
        cache_size(_SC_LEVEL3_CACHE_SIZE, 3, "Unified", 8 * 1024 * 1024),
    };
    return sizes;
}

int64_t stream_store_min_bytes() { return cache_sizes().l3 / 8 * 3; }

}  // namespace detail

void select_isa(const std::string& name) {
    detail::active_kernels();  // settle the initial choice first so it cannot overwrite this one
    detail::Selection chosen[detail::kFamilies];
    for (int f = 0; f < detail::kFamilies; ++f) chosen[f] = detail::choose(name, "select_isa()", f);  // every family
    std::lock_guard<std::mutex> lock(detail::selection_mutex);
    for (int f = 0; f < detail::kFamilies; ++f) {
        detail::selection_reason[f] = chosen[f].reason;
        detail::selected[f].store(chosen[f].kernels, std::memory_order_release);
    }
}

const char* active_isa() { return detail::active_kernels().isa; }

RuntimeInfo runtime_info() {
    RuntimeInfo info;
    const kernels::IsaKernels& k = detail::active_kernels();
    info.isa = k.isa;
    const kernels::IsaKernels& bf16 = detail::family_kernels(Precision::bf16);
    const kernels::IsaKernels& int8 = detail::family_kernels(Precision::int8);
    {
        std::lock_guard<std::mutex> lock(detail::selection_mutex);
        info.isa_reason = detail::selection_reason[0];
        info.bf16_isa_reason = detail::selection_reason[1];
        info.int8_isa_reason = detail::selection_reason[2];
    }
    info.bf16_isa = bf16.isa;
    info.kernel_main = k.main().name;
    for (const kernels::GemmKernel& g : k.gemm) {
        if (g.by_rows == nullptr) continue;
        info.gemm_kernels.emplace_back(g.name);
        info.gemm_kernel_speeds.push_back(g.throughput);
    }
    for (const kernels::GemmKernel& g : bf16.gemm_of(Precision::bf16)) {
        if (g.by_rows != nullptr) info.bf16_gemm_kernels.emplace_back(g.name);
    }
    for (const kernels::GemmKernel& g : int8.gemm_int8) {
        if (g.by_rows != nullptr) info.int8_gemm_kernels.emplace_back(g.name);
    }
    info.int8_isa = int8.int8_isa;
    info.kernel_depthwise = k.depthwise.name;
    for (const auto& isa : detail::known_isas()) {
        if (isa.cpu_has()) info.supported_isas.emplace_back(isa.name);
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#define PWCPU_FEATURE(name) \
    if (__builtin_cpu_supports(name)) info.cpu_features.emplace_back(name);
    PWCPU_FEATURE("sse4.2")
    PWCPU_FEATURE("avx")
    PWCPU_FEATURE("avx2")
    PWCPU_FEATURE("fma")
    PWCPU_FEATURE("avx512f")
    PWCPU_FEATURE("avx512dq")
    PWCPU_FEATURE("avx512bw")
    PWCPU_FEATURE("avx512vl")
    PWCPU_FEATURE("avx512vnni")
    PWCPU_FEATURE("avx512bf16")
    PWCPU_FEATURE("amx-tile")
    PWCPU_FEATURE("amx-bf16")
    PWCPU_FEATURE("amx-int8")
#undef PWCPU_FEATURE
#endif
    const detail::CacheSizes& caches = detail::cache_sizes();
    info.l1d_bytes = caches.l1d;
    info.l2_bytes = caches.l2;
    info.l3_bytes = caches.l3;
    info.stream_store_min_bytes = detail::stream_store_min_bytes();
    info.streamed_output_calls = runtime::streamed_output_calls().load(std::memory_order_relaxed);
    info.reused_output_buffers = reused_buffers(BufferKind::output);
    info.scratch_misses = runtime::scratch_misses();
    for (size_t way = 0; way < info.timed_choice_calls.size(); ++way) {
        info.timed_choice_calls[way] = runtime::timed_choice_calls()[way].load(std::memory_order_relaxed);
    }
    return info;
}

}  // namespace pwcpu
