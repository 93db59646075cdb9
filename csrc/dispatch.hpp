// The dispatch table: which ISA's kernels run, chosen once (at first use) from the CPU's
// features, overridable with PWCPU_ISA=scalar|avx2|avx512 or select_isa().
#pragma once

#include <cstdint>

#include "kernels/ukernel.hpp"

namespace pwcpu::detail {

const kernels::IsaKernels& active_kernels();

struct CacheSizes {
    int64_t l1d, l2, l3;
};
const CacheSizes& cache_sizes();

// Outputs of at least this many bytes are written with non-temporal stores: 3/8 of L3.
int64_t stream_store_min_bytes();

}  // namespace pwcpu::detail
