// Threads for every operator: how many a call gets, how its work is split among them, and the
// parallel region that runs the pieces (denormals flushed, streaming stores fenced).
#pragma once
#include <omp.h>

#include <cstdint>
#include <vector>

#include "pwcpu/pwcpu.hpp"
#include "runtime/memory.hpp"

namespace pwcpu::runtime {

// Threads for a parallel region of up to `wanted` threads: one in a child forked from a
// multi-threaded parent (see threads.cpp).
int region_threads(int wanted);

// Marks a call in flight for its lifetime, so that concurrent callers share the cores instead of
// multiplying threads.
struct CallGuard {
    CallGuard();
    ~CallGuard();
    CallGuard(const CallGuard&) = delete;
    CallGuard& operator=(const CallGuard&) = delete;
};

// Threads for a call of `flops` floating-point operations: shared among concurrent calls, and one
// for small calls, where a fork-join would cost more than it saves.
int call_threads(double flops);

// A rectangle of the (M units x N units) grid given to one thread. NHWC: output pixels x weight
// panels; NCHW: tiles of output channels x pixel panels.
struct WorkRange {
    int64_t m_begin, m_end, n_begin, n_end;
};

// Split `tiles` units of `tile_size` rows (of `rows` in all) and `panels` units of `panel_size`
// columns, over a reduction of length `cg`, on a threads_m x threads_n grid. Among grids of equal
// balance, prefer the one that moves fewer bytes: each thread column reads all the weights of its
// panels, each thread row all the activations of its tiles. `activation_work`: what each thread
// spends on every activation it reads (bf16 rounding), in multiply-adds of one output column.
// rows_first: instead, of the grids within 5 % of the best balance, the one that splits the rows
// most (a layer may time the two: see TimedChoice).
std::vector<WorkRange> partition(int64_t tiles, int64_t tile_size, int64_t rows, int64_t panels, int64_t panel_size,
                                 int64_t cg, int threads, double activation_work = 0.0, bool rows_first = false);

// The calling thread's count for the duration of a scope: operators called inside a worker of a
// parallel region run on that worker alone.
struct ThreadsForThisThread {
    int saved;
    explicit ThreadsForThisThread(int n) : saved(set_num_threads_for_this_thread(n)) {}
    ~ThreadsForThisThread() { set_num_threads_for_this_thread(saved); }
    ThreadsForThisThread(const ThreadsForThisThread&) = delete;
    ThreadsForThisThread& operator=(const ThreadsForThisThread&) = delete;
};

// Runs work(range) for every range: inline for one, else in one parallel region, with denormals
// flushed in every thread and streaming stores fenced.
template <class Work>
void run_ranges(const std::vector<WorkRange>& ranges, bool streaming, const Work& work) {
    const int teams = static_cast<int>(ranges.size());
    if (teams == 1) {
        DenormalsAreZero daz;
        work(ranges[0]);
        if (streaming) fence_streaming_stores();
        return;
    }
#pragma omp parallel num_threads(teams)
    {
        DenormalsAreZero daz;
        // A smaller team than asked for (nested or limited OpenMP) still covers every range.
        for (int r = omp_get_thread_num(); r < teams; r += omp_get_num_threads()) work(ranges[r]);
        if (streaming) fence_streaming_stores();
    }
}

}  // namespace pwcpu::runtime
