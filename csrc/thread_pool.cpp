// The worker pool behind parallel_for: workers poll briefly for the next call, then sleep.
#include "thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace pwcpu::detail {
namespace {

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
}

// How long an idle worker keeps polling for the next call before it sleeps: long enough to catch
// the next layer of a network, short enough not to keep a core from other threads for long.
constexpr std::chrono::microseconds kPollTime{500};

struct Job {
    const std::function<void(int)>* task = nullptr;
    int count = 0;
    int seats = 0;             // workers that may still join (guarded by the pool's mutex)
    std::atomic<int> next{0};  // first unclaimed task
    std::mutex error_mutex;
    std::exception_ptr error;  // the first exception a task threw
};

void work_on(Job& job) {
    for (int i = job.next.fetch_add(1, std::memory_order_relaxed); i < job.count;
         i = job.next.fetch_add(1, std::memory_order_relaxed)) {
        try {
            (*job.task)(i);
        } catch (...) {
            std::lock_guard<std::mutex> lock(job.error_mutex);
            if (!job.error) job.error = std::current_exception();
            job.next.store(job.count, std::memory_order_relaxed);  // claim nothing more
        }
    }
}

class Pool {
public:
    void run(int count, int threads, const std::function<void(int)>& task) {
        bool expected = false;
        if (threads <= 1 || count <= 1 || !in_use_.compare_exchange_strong(expected, true, std::memory_order_acquire)) {
            for (int i = 0; i < count; ++i) task(i);
            return;
        }
        struct Release {
            std::atomic<bool>& flag;
            ~Release() { flag.store(false, std::memory_order_release); }
        } release{in_use_};

        start_workers(threads - 1);
        Job job;
        job.task = &task;
        job.count = count;
        job.seats = std::min(threads, count) - 1;
        bool wake;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = &job;
            generation_.fetch_add(1, std::memory_order_release);
            wake = sleeping_ > 0;
        }
        if (wake) wakeup_.notify_all();
        work_on(job);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = nullptr;  // no worker joins from here on
        }
        // Wait only for tasks that workers have claimed; their results are visible after this.
        while (busy_workers_.load(std::memory_order_acquire) != 0) cpu_relax();
        if (job.error) std::rethrow_exception(job.error);
    }

private:
    void start_workers(int wanted) {
        for (; workers_started_ < wanted; ++workers_started_) std::thread(&Pool::worker_loop, this).detach();
    }

    void worker_loop() {
        uint64_t seen = generation_.load(std::memory_order_acquire);
        for (;;) {
            const auto poll_until = std::chrono::steady_clock::now() + kPollTime;
            while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < poll_until) {
                for (int i = 0; i < 64; ++i) cpu_relax();
            }
            Job* job = nullptr;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                if (generation_.load(std::memory_order_relaxed) == seen) {
                    ++sleeping_;
                    wakeup_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
                    --sleeping_;
                }
                seen = generation_.load(std::memory_order_relaxed);
                if (job_ != nullptr && job_->seats > 0) {
                    job = job_;
                    --job->seats;
                    busy_workers_.fetch_add(1, std::memory_order_relaxed);
                }
            }
            if (job != nullptr) {
                work_on(*job);
                busy_workers_.fetch_sub(1, std::memory_order_release);
            }
        }
    }

    std::atomic<bool> in_use_{false};  // a call is using the workers
    int workers_started_ = 0;          // changed only by the call holding in_use_
    std::mutex mutex_;                 // guards job_, sleeping_ and the seats of a job
    std::condition_variable wakeup_;
    Job* job_ = nullptr;
    int sleeping_ = 0;
    std::atomic<uint64_t> generation_{0};  // counts published jobs
    std::atomic<int> busy_workers_{0};     // workers inside the current job
};

}  // namespace

void parallel_for(int count, int threads, const std::function<void(int)>& task) {
    static Pool* const pool = new Pool;  // never destroyed: detached workers use it until exit
    pool->run(count, threads, task);
}

}  // namespace pwcpu::detail
