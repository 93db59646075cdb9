// The dispatch tables: which ISA's kernels each family runs, chosen once (at first use) from the
// CPU's features, overridable with PWCPU_ISA=scalar|avx2|avx512 (every family),
// PWCPU_BF16_ISA / PWCPU_INT8_ISA (one family) or select_isa() (every family).
#pragma once

#include <cstdint>

#include "kernels/ukernel.hpp"

namespace pwcpu::detail {

// The fp32 family's kernels (and the depthwise and dense operators'); family_kernels gives each
// precision's (fp32, bf16, int8), chosen on its own where PWCPU_BF16_ISA or PWCPU_INT8_ISA is set,
// else as fp32. select_isa() switches every family.
const kernels::IsaKernels& active_kernels();
const kernels::IsaKernels& family_kernels(Precision precision);

struct CacheSizes {
    int64_t l1d, l2, l3;
};
const CacheSizes& cache_sizes();

// Outputs of at least this many bytes are written with non-temporal stores: 3/8 of L3.
int64_t stream_store_min_bytes();

}  // namespace pwcpu::detail
