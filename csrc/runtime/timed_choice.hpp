// A choice between two ways of running a layer that compute the same values bit for bit, made by
// timing the layer's own calls on the machine at hand (as FFTW's planner and cuDNN's benchmark
// mode do): the first calls of each call shape alternate between the ways, later ones take the
// faster. Which way wins can differ between CPUs of the same ISA (their L1 ways, L2 size, FMA
// width), and no cache-size rule read off one machine picks it on another.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace pwcpu::runtime {

// Calls that ran each way, over every TimedChoice (runtime_info() shows them: tests see both ways run).
inline std::array<std::atomic<int64_t>, 2>& timed_choice_calls() {
    static std::array<std::atomic<int64_t>, 2> calls{};
    return calls;
}

class TimedChoice {
public:
    static constexpr int kTrialsPerWay = 2;
    static constexpr size_t kMaxShapes = 16;  // beyond, new shapes take the first way untimed

    struct Pick {
        int way;     // 0 or 1
        bool timed;  // a trial: report its time through record()
    };

    // The way a call of this shape (its rows and threads) runs. Off (PWCPU_LAYER_TIMING=0): the first.
    Pick pick(int64_t rows, int threads) {
        const Pick p = choose(rows, threads);
        timed_choice_calls()[static_cast<size_t>(p.way)].fetch_add(1, std::memory_order_relaxed);
        return p;
    }

    void record(int64_t rows, int threads, int way, double seconds) {
        const std::lock_guard<std::mutex> lock(mutex_);
        Shape* shape = find(rows, threads);
        if (shape == nullptr || shape->chosen >= 0) return;
        ++shape->trials[way];
        if (seconds < shape->fastest[way]) shape->fastest[way] = seconds;
        if (shape->trials[0] >= kTrialsPerWay && shape->trials[1] >= kTrialsPerWay) {
            shape->chosen = shape->fastest[1] < shape->fastest[0] ? 1 : 0;
        }
    }

private:
    Pick choose(int64_t rows, int threads) {
        if (!enabled()) return {0, false};
        const std::lock_guard<std::mutex> lock(mutex_);
        Shape* shape = find(rows, threads);
        if (shape == nullptr) {
            if (shapes_.size() >= kMaxShapes) return {0, false};
            shapes_.push_back(Shape{rows, threads});
            shape = &shapes_.back();
        }
        if (shape->chosen >= 0) return {shape->chosen, false};
        return {(shape->trials[0] + shape->trials[1]) % 2, true};
    }

    struct Shape {
        int64_t rows;
        int threads;
        int chosen = -1;
        std::array<int, 2> trials{};
        std::array<double, 2> fastest{std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    };

    static bool enabled() {
        static const bool on = [] {
            const char* env = std::getenv("PWCPU_LAYER_TIMING");
            return env == nullptr || std::strcmp(env, "0") != 0;
        }();
        return on;
    }

    Shape* find(int64_t rows, int threads) {
        for (Shape& s : shapes_) {
            if (s.rows == rows && s.threads == threads) return &s;
        }
        return nullptr;
    }

    std::mutex mutex_;
    std::vector<Shape> shapes_;
};

}  // namespace pwcpu::runtime
