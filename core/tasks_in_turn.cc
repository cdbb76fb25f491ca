#include "core/tasks_in_turn.h"

#include "core/omp_threads.h"

namespace attnserve {

std::vector<absl::Status> RunTasksInTurn(int team, int64_t count, const std::function<absl::Status(int64_t)>& task,
                                         const std::string& out_of_memory_message) {
  std::vector<absl::Status> status(static_cast<size_t>(count));
  std::vector<uint8_t> threw(static_cast<size_t>(count), 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
  for (int64_t i = 0; i < count; ++i) {
    try {
      const ScopedOmpThreads one(1);
      status[i] = task(i);
    } catch (...) {
      threw[i] = 1;
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    if (threw[i] != 0) status[i] = absl::ResourceExhaustedError(out_of_memory_message);
  }
  return status;
}

}  // namespace attnserve
