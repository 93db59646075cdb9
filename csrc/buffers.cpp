// Memory for packed weights and outputs (see pwcpu.hpp): 64-byte aligned, huge pages from 2 MiB,
// and the most recently freed block of each kind kept for reuse.
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>

#include "pwcpu/pwcpu.hpp"

namespace pwcpu {
namespace {

constexpr size_t kLine = 64;
constexpr size_t kHugePage = size_t{2} << 20;
// The largest block kept as a spare: beyond it, holding memory nobody uses costs more than the
// page faults it would save.
constexpr size_t kMaxSpareBytes = size_t{256} << 20;

struct Spare {
    std::mutex mutex;
    void* data = nullptr;
    size_t bytes = 0;
};

Spare& spare(BufferKind kind) {
    static auto* spares = new Spare[2];  // never destroyed: buffers may be freed during exit
    return spares[kind == BufferKind::output ? 1 : 0];
}

// What is actually allocated for a request: whole cache lines, or whole huge pages from 2 MiB.
size_t block_bytes(size_t bytes) {
    const size_t unit = bytes >= kHugePage ? kHugePage : kLine;
    return std::max(kLine, (bytes + unit - 1) / unit * unit);
}

}  // namespace

void* allocate_buffer(size_t bytes, BufferKind kind, const char* what) {
    if (bytes > (size_t{1} << 62)) {
        throw AllocationError(std::string("cannot allocate ") + std::to_string(bytes) + " bytes for " + what);
    }
    const size_t block = block_bytes(bytes);
    Spare& s = spare(kind);
    {
        std::lock_guard<std::mutex> lock(s.mutex);
        if (s.data != nullptr && s.bytes >= block && s.bytes <= 2 * block) {
            s.bytes = 0;
            return std::exchange(s.data, nullptr);
        }
    }
    const bool huge = block >= kHugePage;
    void* p = std::aligned_alloc(huge ? kHugePage : kLine, block);
    if (p == nullptr) throw AllocationError(std::string("cannot allocate ") + std::to_string(block) + " bytes for " + what);
#if defined(MADV_HUGEPAGE)
    // Fewer, larger page faults when the block is first written (where the kernel allows it).
    if (huge) madvise(p, block, MADV_HUGEPAGE);
#endif
    return p;
}

void free_buffer(void* p, size_t bytes, BufferKind kind) {
    if (p == nullptr) return;
    const size_t block = block_bytes(bytes);
    if (block <= kMaxSpareBytes) {  // the most recent block is the likeliest to be asked for again
        Spare& s = spare(kind);
        std::lock_guard<std::mutex> lock(s.mutex);
        std::swap(p, s.data);
        s.bytes = block;
    }
    std::free(p);
}

}  // namespace pwcpu
