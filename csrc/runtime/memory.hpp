// Sizes, buffers and the floating-point and store state shared by every operator's driver.
#pragma once
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "dispatch.hpp"
#include "pwcpu/pwcpu.hpp"

namespace pwcpu::runtime {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a * b for sizes that come from the caller (broadcast views make absurd extents cheap): an
// overflow is an error naming what was being sized, never a wrapped size and a short buffer.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
    int64_t product = 0;
    if (__builtin_mul_overflow(a, b, &product)) throw std::length_error(std::string(what) + " is too large to describe");
    return product;
}

// A buffer of `count` floats must also be describable in bytes.
inline size_t checked_floats(int64_t count, const char* what) {
    return static_cast<size_t>(checked_mul(count, static_cast<int64_t>(sizeof(float)), what)) / sizeof(float);
}

class ScratchArena;

// Packed weights (allocate_floats) and a call's scratch (scratch_floats). conv1x1 packs on every
// call, so its weights come from allocate_buffer, which keeps the last few blocks freed: page
// faults on fresh pages cost more than packing itself.
struct BufferFree {
    size_t bytes;
    ScratchArena* arena = nullptr;  // the arena of the thread that took it from one
    void operator()(float* p) const;
};
using AlignedBuffer = std::unique_ptr<float[], BufferFree>;

inline AlignedBuffer allocate_floats(size_t count, const char* what) {
    const size_t bytes = count * sizeof(float);
    return AlignedBuffer(static_cast<float*>(allocate_buffer(bytes, BufferKind::packed_weights, what)), BufferFree{bytes});
}

// Work memory that lives within one call on one thread (im2col bands, a fused block's rows, padded
// copies, partial sums): the calling thread's arena, a block that grows to the most the thread has
// needed at once (up to 32 MiB) and is then reused by every call, as TFLite's and ONNX Runtime's
// planned arenas are. A network's layers ask for dozens of such buffers of different sizes per
// call: fresh ones cost page faults and, from several threads, the TLB flushes of returning them.
// The buffer must be freed by the thread that took it.
AlignedBuffer scratch_floats(size_t count, const char* what);
// Requests so far that the arenas could not serve (served by allocate_buffer instead).
int64_t scratch_misses();

// Flush denormals to zero for the duration of a call on this thread, then restore the caller's
// floating-point state: denormal inputs must not make a call slow. (x86; elsewhere a no-op.)
#if defined(__x86_64__) || defined(__i386__)
struct DenormalsAreZero {
    unsigned saved = _mm_getcsr();
    DenormalsAreZero() { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
    ~DenormalsAreZero() { _mm_setcsr(saved); }
};
#else
struct DenormalsAreZero {};
#endif

// Non-temporal stores are weakly ordered: each thread fences them before its work counts as done.
inline void fence_streaming_stores() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_sfence();
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

// Outputs larger than 3/8 of the last-level cache are written with non-temporal stores: they skip
// reading every output line before overwriting it, and most of such an output would be evicted
// (by the input, the weights, other cores) before the next layer reads it anyway. Measured on a
// 32 MiB L3 (streaming against plain stores, 1 / 2 threads): 4x56x56x64->256 (12 MiB out)
// +12 % / +6 %, 8x56x56x24->144 (14 MiB) +51 % / 0 %, 16x56x56x24->144 (28 MiB) +69 % / +62 %;
// smaller outputs stay cached and lose: 2x112x112x16->96 (9 MiB) +6 % / -12 %,
// 4x56x56x24->144 (7 MiB) -16 % / -20 %.
// Calls that chose streaming stores, counted so that tests can see the choice being made.
inline std::atomic<int64_t>& streamed_output_calls() {
    static std::atomic<int64_t> calls{0};
    return calls;
}

inline bool streams_output(int64_t floats) {
    const bool stream = floats * static_cast<int64_t>(sizeof(float)) >= detail::stream_store_min_bytes();
    if (stream) streamed_output_calls().fetch_add(1, std::memory_order_relaxed);
    return stream;
}

}  // namespace pwcpu::runtime
