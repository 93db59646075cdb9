// Per-thread scratch arenas (see scratch_floats in memory.hpp).
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

#include "runtime/memory.hpp"

// Under AddressSanitizer the arena's free space and the padding after each piece stay poisoned, so
// a read or write past a buffer is still caught, as it is for separately allocated ones.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define PWCPU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define PWCPU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define PWCPU_POISON(p, n) ((void)(p), (void)(n))
#define PWCPU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace pwcpu::runtime {

namespace {

constexpr size_t kLine = 64;
constexpr size_t kHugePage = size_t{2} << 20;
// Beyond this, a thread's scratch comes from allocate_buffer: a process should not keep hundreds of
// MiB per thread for one large call it made once.
constexpr size_t kMaxArenaBytes = size_t{32} << 20;

std::atomic<int64_t> misses{0};

}  // namespace

// A stack of pieces in one block. A piece freed out of order is marked and released with the
// pieces above it. A request that does not fit is left to allocate_buffer and remembered: the next
// time the arena is empty (between calls), its block grows to the largest stack seen.
class ScratchArena {
public:
    ~ScratchArena() {
        PWCPU_UNPOISON(base_, capacity_);
        std::free(base_);
    }

    float* take(size_t requested) {
        const size_t bytes = std::max(kLine, (requested + kLine - 1) / kLine * kLine);
        if (pieces_.empty() && wanted_ > capacity_) grow();
        if (top_ + bytes > capacity_) {
            wanted_ = std::max(wanted_, std::min(kMaxArenaBytes, top_ + bytes));
            return nullptr;
        }
        pieces_.push_back({top_, bytes, true});
        char* p = static_cast<char*>(base_) + top_;
        PWCPU_UNPOISON(p, requested);
        top_ += bytes;
        return reinterpret_cast<float*>(p);
    }

    void give_back(const float* p) {
        const size_t offset = static_cast<size_t>(reinterpret_cast<const char*>(p) - static_cast<char*>(base_));
        for (auto piece = pieces_.rbegin(); piece != pieces_.rend(); ++piece) {
            if (piece->offset == offset && piece->live) {
                piece->live = false;
                PWCPU_POISON(static_cast<char*>(base_) + offset, piece->bytes);
                break;
            }
        }
        while (!pieces_.empty() && !pieces_.back().live) {
            top_ = pieces_.back().offset;
            pieces_.pop_back();
        }
    }

private:
    struct Piece {
        size_t offset, bytes;
        bool live;
    };

    void grow() {
        PWCPU_UNPOISON(base_, capacity_);
        std::free(base_);
        const bool huge = wanted_ >= kHugePage;
        const size_t unit = huge ? kHugePage : kLine;
        capacity_ = (wanted_ + unit - 1) / unit * unit;
        base_ = std::aligned_alloc(unit, capacity_);
        if (base_ == nullptr) {
            capacity_ = wanted_ = 0;  // requests go to allocate_buffer, which reports a failure
            return;
        }
#if defined(MADV_HUGEPAGE)
        if (huge) madvise(base_, capacity_, MADV_HUGEPAGE);
#endif
        PWCPU_POISON(base_, capacity_);
    }

    void* base_ = nullptr;
    size_t capacity_ = 0, top_ = 0, wanted_ = 0;
    std::vector<Piece> pieces_;
};

AlignedBuffer scratch_floats(size_t count, const char* what) {
    thread_local ScratchArena arena;
    const size_t bytes = count * sizeof(float);
    if (float* p = arena.take(bytes)) return AlignedBuffer(p, BufferFree{bytes, &arena});
    misses.fetch_add(1, std::memory_order_relaxed);
    return allocate_floats(count, what);
}

void BufferFree::operator()(float* p) const {
    if (arena != nullptr) {
        arena->give_back(p);
    } else {
        free_buffer(p, bytes, BufferKind::packed_weights);
    }
}

int64_t scratch_misses() { return misses.load(std::memory_order_relaxed); }

}  // namespace pwcpu::runtime
