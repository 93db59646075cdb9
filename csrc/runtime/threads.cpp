// Thread counts, fork safety and work partitioning, shared by every operator.
#include "runtime/threads.hpp"

#include <dirent.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <utility>

namespace pwcpu {
namespace runtime {

namespace {

// GNU OpenMP cannot run a parallel region in a child forked after the parent started its thread
// pool: the child waits forever for threads that were not copied. The pool may have been started
// by anyone sharing the OpenMP runtime (PyTorch among them), so a fork from a parent that had more
// than one thread (or whose threads cannot be counted) leaves the child on one thread; a child of
// a single-threaded parent, where no pool can exist, runs normally. Spawned processes start afresh.
std::atomic<bool> parent_had_threads{true};
std::atomic<bool> forked_after_threads{false};

// Threads of this process, from /proc; 0 when they cannot be counted.
int64_t process_thread_count() {
    DIR* tasks = opendir("/proc/self/task");
    if (tasks == nullptr) return 0;
    int64_t count = 0;
    while (const dirent* entry = readdir(tasks)) count += entry->d_name[0] != '.';
    closedir(tasks);
    return count;
}

void before_fork() { parent_had_threads.store(process_thread_count() != 1, std::memory_order_relaxed); }

void on_fork_child() {
    if (parent_had_threads.load(std::memory_order_relaxed)) forked_after_threads.store(true, std::memory_order_relaxed);
}

[[maybe_unused]] const bool fork_handlers_registered = [] {
    return pthread_atfork(before_fork, nullptr, on_fork_child) == 0;
}();

}  // namespace

int region_threads(int wanted) {
    return wanted <= 1 || forked_after_threads.load(std::memory_order_relaxed) ? 1 : wanted;
}

namespace {

// pwcpu's own thread count, never above OpenMP's setting for the calling thread (OMP_NUM_THREADS,
// threadpoolctl, else the cores), which it leaves alone: PyTorch and other users of the process's
// OpenMP runtime keep theirs. 0 = follow OpenMP's setting. A per-thread override comes first.
std::atomic<int> requested_threads{0};
thread_local int scoped_threads = 0;
// Calls in flight, so that concurrent callers share the cores instead of multiplying threads.
std::atomic<int> calls_in_flight{0};

}  // namespace

std::atomic<bool> take_rows_first{false};

CallGuard::CallGuard() { calls_in_flight.fetch_add(1, std::memory_order_relaxed); }
CallGuard::~CallGuard() { calls_in_flight.fetch_sub(1, std::memory_order_relaxed); }

int call_threads(double flops) {
    if (flops < 4.0e5) return 1;
    const int threads = get_num_threads() / std::max(1, calls_in_flight.load(std::memory_order_relaxed));
    return region_threads(std::max(1, threads));
}

std::vector<WorkRange> partition(int64_t tiles, int64_t tile_size, int64_t rows, int64_t panels, int64_t panel_size,
                                 int64_t cg, int threads, double activation_work, bool rows_first) {
    struct Candidate {
        int tm, tn;
        double cost, slowest;
    };
    std::vector<Candidate> candidates;
    for (int tm = 1; tm <= threads; ++tm) {
        if (threads % tm != 0) continue;
        const int tn = threads / tm;
        if (tm > tiles || tn > panels) continue;
        const double rows_per_thread = static_cast<double>(ceil_div(tiles, tm) * tile_size);
        const double thread_rows = std::min<double>(rows_per_thread, static_cast<double>(rows));
        const double slowest = thread_rows * static_cast<double>(ceil_div(panels, tn) * panel_size) *
                                   static_cast<double>(cg + 8) +
                               thread_rows * static_cast<double>(cg) * activation_work;
        const double traffic = static_cast<double>(tn) * static_cast<double>(rows) * static_cast<double>(cg) +
                               static_cast<double>(tm) * static_cast<double>(panels * panel_size) * static_cast<double>(cg);
        candidates.push_back({tm, tn, slowest + 0.25 * traffic, slowest});
    }
    Candidate best{1, 1, 0.0, 0.0};
    double most_balanced = 0.0;
    for (size_t i = 0; i < candidates.size(); ++i) {
        if (i == 0 || candidates[i].cost < best.cost) best = candidates[i];
        if (i == 0 || candidates[i].slowest < most_balanced) most_balanced = candidates[i].slowest;
    }
    if (rows_first) {
        for (const Candidate& c : candidates) {  // (tm rises through the list)
            if (c.slowest <= 1.05 * most_balanced) best = c;
        }
    }
    std::vector<WorkRange> ranges;
    for (int i = 0; i < best.tm; ++i) {
        for (int j = 0; j < best.tn; ++j) {
            ranges.push_back({tiles * i / best.tm, tiles * (i + 1) / best.tm, panels * j / best.tn,
                              panels * (j + 1) / best.tn});
        }
    }
    return ranges;
}

}  // namespace runtime

bool single_threaded_after_fork() { return runtime::forked_after_threads.load(std::memory_order_relaxed); }

int get_num_threads() {
    if (single_threaded_after_fork()) return 1;
    const int omp_threads = std::max(1, omp_get_max_threads());
    const int scoped = runtime::scoped_threads;
    const int requested = scoped > 0 ? scoped : runtime::requested_threads.load(std::memory_order_relaxed);
    return requested > 0 ? std::min(requested, omp_threads) : omp_threads;
}

void set_take_rows_first(bool first) { runtime::take_rows_first.store(first, std::memory_order_relaxed); }

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: the number of threads must be >= 1");
    runtime::requested_threads.store(n, std::memory_order_relaxed);
}

int set_num_threads_for_this_thread(int n) {
    if (n < 0) throw std::invalid_argument("set_num_threads_for_this_thread: the number of threads must be >= 0");
    return std::exchange(runtime::scoped_threads, n);
}

// ---- peak ----------------------------------------------------------------------------------

double measure_fma_peak_gflops(int threads, double seconds) {
    if (threads < 1) throw std::invalid_argument("measure_fma_peak_gflops: threads must be >= 1");
    threads = runtime::region_threads(threads);
    const kernels::IsaKernels& isa = detail::active_kernels();
    const size_t iterations = 1u << 16;
    double best = 0.0;
    volatile float sink = 0.0f;
    const double start = omp_get_wtime();
    do {
        const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            const float v = isa.fma_probe(iterations);
#pragma omp atomic
            sink += v;
        }
        const double elapsed = omp_get_wtime() - t0;
        best = std::max(best, 2.0 * isa.fma_per_iteration * static_cast<double>(iterations) * threads / elapsed / 1e9);
    } while (omp_get_wtime() - start < seconds);
    return best;
}

}  // namespace pwcpu
