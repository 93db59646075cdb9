// Memory for packed weights and outputs (see pwcpu.hpp): 64-byte aligned, huge pages from 2 MiB,
// and the last few freed blocks of each kind kept for reuse.
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "pwcpu/pwcpu.hpp"

namespace pwcpu {
namespace {

constexpr size_t kLine = 64;
constexpr size_t kHugePage = size_t{2} << 20;
// Freed blocks kept for reuse, per kind: the most recently freed first (the likeliest to be in
// cache). A network's layers free and ask for outputs of a few sizes in turn, so a few blocks are
// kept, not one; beyond kMaxSpareBytes in all, holding memory nobody uses costs more than the page
// faults and cache misses it would save.
constexpr size_t kSpareBlocks = 8;
constexpr size_t kMaxSpareBytes = size_t{256} << 20;

struct Block {
    void* data = nullptr;
    size_t bytes = 0;
};

struct Spare {
    std::mutex mutex;
    std::deque<Block> blocks;  // most recently freed first
    size_t bytes = 0;
    int64_t reused = 0;  // requests served from the blocks
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
        const auto fits = [block](const Block& b) { return b.bytes >= block && b.bytes <= 2 * block; };
        const auto found = std::find_if(s.blocks.begin(), s.blocks.end(), fits);
        if (found != s.blocks.end()) {
            void* p = found->data;
            s.bytes -= found->bytes;
            s.blocks.erase(found);
            ++s.reused;
            return p;
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
    if (block > kMaxSpareBytes) {
        std::free(p);
        return;
    }
    std::vector<void*> released;  // freed outside the lock
    {
        Spare& s = spare(kind);
        std::lock_guard<std::mutex> lock(s.mutex);
        s.blocks.push_front({p, block});
        s.bytes += block;
        while (s.blocks.size() > kSpareBlocks || s.bytes > kMaxSpareBytes) {
            released.push_back(s.blocks.back().data);
            s.bytes -= s.blocks.back().bytes;
            s.blocks.pop_back();
        }
    }
    for (void* old : released) std::free(old);
}

int64_t reused_buffers(BufferKind kind) {
    Spare& s = spare(kind);
    std::lock_guard<std::mutex> lock(s.mutex);
    return s.reused;
}

}  // namespace pwcpu
