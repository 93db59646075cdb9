// pwcpu's worker threads: the driver's parallel loops run here rather than in OpenMP regions.
//
// An OpenMP region ends in a barrier that waits for every thread of the team, and a worker whose
// core is taken (on a small machine, by another library's threads spinning after their own work:
// OpenBLAS's do for tens of milliseconds after each NumPy matrix product) holds the whole call up
// for a scheduler time slice: milliseconds, for a layer of microseconds. Here the caller starts at
// once and takes every task that no worker has claimed, so it only ever waits for work that is
// actually being done. OpenMP still provides the thread-count setting (OMP_NUM_THREADS,
// omp_set_num_threads, threadpoolctl).
#pragma once

#include <functional>

namespace pwcpu::detail {

// Runs task(0) .. task(count - 1) on the calling thread and up to threads - 1 pool workers, and
// returns when all have finished. Tasks are claimed one at a time, in order. A call made while
// another call is using the pool (from another thread, or from inside a task) runs its tasks on
// the calling thread alone.
void parallel_for(int count, int threads, const std::function<void(int)>& task);

}  // namespace pwcpu::detail
