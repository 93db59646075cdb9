// Threads for every operator: how many a call gets, how its work is split among them, and the
// parallel region that runs the pieces (denormals flushed, streaming stores fenced).
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
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

// Set by set_take_rows_first (tests): threads take from the others' ranges before their own.
extern std::atomic<bool> take_rows_first;

// Rows left in each thread's range, claimed a few at a time: by the range's own thread from the
// front, in order, and by threads whose own range is done from the back. (begin, end) pack into one
// word, so a claim is one compare-and-swap.
class RowClaims {
public:
    explicit RowClaims(const std::vector<WorkRange>& ranges) : spans_(new Span[ranges.size()]) {
        for (size_t r = 0; r < ranges.size(); ++r) {
            spans_[r].rows.store(pack(ranges[r].m_begin, ranges[r].m_end), std::memory_order_relaxed);
        }
    }
    // Whether rows this far apart fit the packing.
    static bool fits(int64_t rows) { return rows >= 0 && rows < (int64_t{1} << 31); }

    bool front(size_t r, int64_t step, int64_t& begin, int64_t& end) { return claim(r, step, true, begin, end); }
    bool back(size_t r, int64_t step, int64_t& begin, int64_t& end) { return claim(r, step, false, begin, end); }

private:
    struct alignas(64) Span {
        std::atomic<uint64_t> rows;
    };
    static uint64_t pack(int64_t begin, int64_t end) {
        return static_cast<uint64_t>(begin) << 32 | static_cast<uint64_t>(end);
    }
    bool claim(size_t r, int64_t step, bool from_front, int64_t& begin, int64_t& end) {
        uint64_t rows = spans_[r].rows.load(std::memory_order_relaxed);
        for (;;) {
            const int64_t b = static_cast<int64_t>(rows >> 32), e = static_cast<int64_t>(rows & 0xffffffffu);
            if (b >= e) return false;
            begin = from_front ? b : std::max(b, e - step);
            end = from_front ? std::min(e, b + step) : e;
            const uint64_t left = from_front ? pack(end, e) : pack(b, begin);
            if (spans_[r].rows.compare_exchange_weak(rows, left, std::memory_order_relaxed)) return true;
        }
    }
    std::unique_ptr<Span[]> spans_;
};

// Like run_ranges for ranges of rows (one column of ranges), but balanced while it runs: each
// thread makes a worker (make_worker(), for its buffers and state) and gives it its range's rows
// `step` at a time, in order; a thread whose range is done takes `step` rows at a time from the
// back of the others' ranges. On a busy or virtual machine a thread is often held up by a tenth of
// the call or more (measured on a 2-core Zen 4 VM: 10-20 % of a fused block's or depthwise
// layer's time per call, either thread), which a static split makes the whole call wait for.
// worker(begin, end) must accept any rows, in any order; the rows it is given run on from the
// previous ones only when begin equals the previous end.
template <class MakeWorker>
void run_rows_balanced(const std::vector<WorkRange>& ranges, int64_t step, const MakeWorker& make_worker) {
    const int teams = static_cast<int>(ranges.size());
    const bool claimable = teams > 1 && RowClaims::fits(ranges.back().m_end);
    if (!claimable) {
        run_ranges(ranges, false, [&](const WorkRange& range) { make_worker()(range.m_begin, range.m_end); });
        return;
    }
    RowClaims claims(ranges);
#pragma omp parallel num_threads(teams)
    {
        DenormalsAreZero daz;
        auto worker = make_worker();
        int64_t begin = 0, end = 0;
        const auto take_others = [&] {
            for (int k = 1; k < teams; ++k) {
                const size_t victim = static_cast<size_t>((omp_get_thread_num() + k) % teams);
                while (claims.back(victim, step, begin, end)) worker(begin, end);
            }
        };
        if (take_rows_first.load(std::memory_order_relaxed)) take_others();
        // A smaller team than asked for (nested or limited OpenMP) still covers every range.
        for (int r = omp_get_thread_num(); r < teams; r += omp_get_num_threads()) {
            while (claims.front(static_cast<size_t>(r), step, begin, end)) worker(begin, end);
        }
        take_others();
    }
}

}  // namespace pwcpu::runtime
