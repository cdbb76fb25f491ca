// Independent tasks taken in turn by an OpenMP team, each with single-threaded primitives: on 2 shared cores a
// primitive split statically over the team stalls as a whole while one of its threads is preempted, whereas tasks
// taken in turn let the running thread take the preempted one's share (BENCHMARKS.md, issue #13).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace attnserve {

// Runs task(i) for each i in [0, count) on a new team of `team` threads (>= 1; with 1, on the calling thread),
// dynamically scheduled one task at a time, each under ScopedOmpThreads(1). Returns each task's status; a task
// that threw (std::bad_alloc from a buffer grown on first use: nothing may leave a parallel region) gets
// ResourceExhausted with `out_of_memory_message`. Every task runs, whatever the others returned.
std::vector<absl::Status> RunTasksInTurn(int team, int64_t count, const std::function<absl::Status(int64_t)>& task,
                                         const std::string& out_of_memory_message);

}  // namespace attnserve
