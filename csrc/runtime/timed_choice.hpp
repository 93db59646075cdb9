// A choice between ways of running a layer that compute the same values bit for bit, made by
// timing the layer's own calls on the machine at hand (as FFTW's planner and cuDNN's benchmark
// mode do): the first calls of each call shape take the ways in turn, later ones the fastest.
// Which way wins can differ between CPUs of the same ISA (their L1 ways, L2 size, FMA width,
// cores sharing a cache), and no rule read off one machine picks it on another.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace pwcpu::runtime {

// Calls that ran each way, over every TimedChoice (runtime_info() shows them: tests see every way run).
inline std::array<std::atomic<int64_t>, 4>& timed_choice_calls() {
    static std::array<std::atomic<int64_t>, 4> calls{};
    return calls;
}

class TimedChoice {
public:
    static constexpr int kTrialsPerWay = 2;
    static constexpr int kMaxWays = 4;
    static constexpr size_t kMaxShapes = 16;  // beyond, new shapes take the first way untimed

    struct Pick {
        int way;     // 0 .. ways - 1
        bool timed;  // a trial: report its time through record()
    };

    // The way, of `ways` (1 .. kMaxWays), a call of this shape (its rows and threads, and the ways
    // open to it) runs. Off (PWCPU_LAYER_TIMING=0): the first.
    Pick pick(int64_t rows, int threads, int ways) {
        if (ways <= 1) return {0, false};
        const Pick p = choose(rows, threads, ways);
        timed_choice_calls()[static_cast<size_t>(p.way)].fetch_add(1, std::memory_order_relaxed);
        return p;
    }

    void record(int64_t rows, int threads, int ways, int way, double seconds) {
        const std::lock_guard<std::mutex> lock(mutex_);
        Shape* shape = find(rows, threads, std::min(ways, kMaxWays));
        if (shape == nullptr || shape->chosen >= 0) return;
        ++shape->total_trials;
        if (seconds < shape->fastest[way]) shape->fastest[way] = seconds;
        if (shape->total_trials >= kTrialsPerWay * shape->ways) {
            shape->chosen = 0;
            for (int w = 1; w < shape->ways; ++w) {
                if (shape->fastest[w] < shape->fastest[shape->chosen]) shape->chosen = w;
            }
        }
    }

private:
    Pick choose(int64_t rows, int threads, int ways) {
        if (!enabled()) return {0, false};
        const std::lock_guard<std::mutex> lock(mutex_);
        ways = std::min(ways, kMaxWays);
        Shape* shape = find(rows, threads, ways);
        if (shape == nullptr) {
            if (shapes_.size() >= kMaxShapes) return {0, false};
            shapes_.push_back(Shape{rows, threads, ways});
            shape = &shapes_.back();
        }
        if (shape->chosen >= 0) return {shape->chosen, false};
        return {shape->total_trials % shape->ways, true};
    }

    static constexpr double kNever = std::numeric_limits<double>::infinity();
    struct Shape {
        int64_t rows;
        int threads;
        int ways;
        int chosen = -1;
        int total_trials = 0;
        std::array<double, kMaxWays> fastest{kNever, kNever, kNever, kNever};
    };

    static bool enabled() {
        static const bool on = [] {
            const char* env = std::getenv("PWCPU_LAYER_TIMING");
            return env == nullptr || std::strcmp(env, "0") != 0;
        }();
        return on;
    }

    Shape* find(int64_t rows, int threads, int ways) {
        for (Shape& s : shapes_) {
            if (s.rows == rows && s.threads == threads && s.ways == ways) return &s;
        }
        return nullptr;
    }

    std::mutex mutex_;
    std::vector<Shape> shapes_;
};

}  // namespace pwcpu::runtime
