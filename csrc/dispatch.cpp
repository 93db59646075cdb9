#include "dispatch.hpp"
#include "runtime/memory.hpp"

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

// Each fp32 GEMM kernel of `gemm`'s speed per multiply-add lane relative to the first (main) one,
// on full tiles of a reduction of 256 laid out as the driver lays them out (panels on cache lines:
// a vector load that straddles two lines costs Zen 4 about a third of the 256-bit kernels' speed).
// Every round times each kernel once, back to back; the median over rounds of each kernel's ratio
// to the main one in the same round is robust to a slow phase of the machine (which slows a whole
// round) and to a round a neighbour interrupts.
std::vector<double> relative_speeds(const kernels::IsaKernels::GemmKernels& gemm) {
    constexpr size_t kReduction = 256;
    constexpr int kCalls = 48, kRounds = 15;
    size_t rows = 0, columns = 0;
    for (const kernels::GemmKernel& k : gemm) {
        rows = std::max(rows, static_cast<size_t>(k.mr));
        columns = std::max(columns, static_cast<size_t>(k.nr));
    }
    const char* what = "kernel timing";
    const runtime::AlignedBuffer a = runtime::allocate_floats(rows * kReduction, what);
    const runtime::AlignedBuffer panel = runtime::allocate_floats(columns * (kReduction + 1), what);
    const runtime::AlignedBuffer c = runtime::allocate_floats(rows * columns, what);
    std::fill_n(a.get(), rows * kReduction, 1e-3f);
    std::fill_n(panel.get(), columns * (kReduction + 1), 1e-3f);
    std::vector<const float*> a_rows(rows);
    std::vector<float*> c_rows(rows);
    for (size_t m = 0; m < rows; ++m) {
        a_rows[m] = a.get() + m * kReduction;
        c_rows[m] = c.get() + m * columns;
    }
    std::vector<std::vector<double>> ratios(gemm.size());
    for (int round = 0; round < kRounds; ++round) {
        std::vector<double> seconds_per_lane(gemm.size());
        for (size_t i = 0; i < gemm.size(); ++i) {
            const kernels::GemmKernel& k = gemm[i];
            if (k.by_rows == nullptr) continue;
            kernels::GemmTileArgs args{};
            args.a = a_rows.data();
            args.c = c_rows.data();
            args.bias = panel.get();
            args.w = panel.get() + k.nr;
            args.kc = kReduction;
            args.nr = static_cast<size_t>(k.nr);
            args.final = true;
            args.act = Activation::none;
            const kernels::GemmTileFn tile = k.by_rows[k.mr - 1];
            tile(args);  // warm up
            const auto start = std::chrono::steady_clock::now();
            for (int call = 0; call < kCalls; ++call) tile(args);
            const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            seconds_per_lane[i] = seconds / (static_cast<double>(kCalls) * k.mr * k.nr * kReduction);
        }
        for (size_t i = 0; i < gemm.size(); ++i) ratios[i].push_back(seconds_per_lane[0] / seconds_per_lane[i]);
    }
    std::vector<double> speeds(gemm.size(), 1.0);
    for (size_t i = 1; i < gemm.size(); ++i) {
        std::nth_element(ratios[i].begin(), ratios[i].begin() + kRounds / 2, ratios[i].end());
        speeds[i] = ratios[i][kRounds / 2];
    }
    return speeds;
}

// Entry i's table as the dispatch hands it out. Where it serves fp32, its fp32 GEMM kernels'
// relative speeds are timed on this CPU (unless PWCPU_KERNEL_TIMING=0), for they differ between
// machines: AMD Zen 4 runs a 512-bit FMA as two 256-bit halves, so the 14x24 kernel, whose last
// 8 columns are a half vector, does 24 columns at 0.93 of the 14x32 one's speed per column; on
// CPUs with full-width units it does them at the cost of 32. A layer's kernel follows from them.
// Kernels no layer width would take are dropped, so runtime_info lists what can run. Every kernel
// computes the same sums in the same order: the choice changes speed, never results.
const kernels::IsaKernels& usable_table(size_t entry) {
    constexpr size_t kMaxIsas = 8;
    static std::once_flag once[kMaxIsas];
    static kernels::IsaKernels tables[kMaxIsas];
    if (entry >= kMaxIsas) throw std::logic_error("usable_table: too many ISAs");
    std::call_once(once[entry], [entry] {
        kernels::IsaKernels table = known_isas()[entry].table();
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
            if (!set[from]) chosen[f].reason = "best ISA this CPU supports (PWCPU_ISA not set)";
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
    return info;
}

}  // namespace pwcpu
