// The engine's kernels keep their buffers per thread from call to call (thread_local, grown to the largest
// request each thread ran): on the thread that runs a batch and on each thread of its OpenMP team. A worker about
// to idle lets them all go, so that a burst's memory (a long request's flash head copies hold tens of MiB per
// thread) goes back when the burst ends, and not only the calling thread's.
#pragma once

#include <cstddef>

namespace attnserve {

// Frees the scratch above keep_bytes of every engine kernel on the calling thread and, when threads > 1, on each
// thread of an OpenMP team of that size: pass the largest team its batches ran with since it last released
// (libgomp keeps one pool of team threads per calling thread, so these are the threads its batches ran on). Call
// it outside a parallel region, while no batch of this thread runs.
void ReleaseTeamScratch(int threads, size_t keep_bytes = size_t{1} << 20);

}  // namespace attnserve
