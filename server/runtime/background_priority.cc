#include "server/runtime/background_priority.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <thread>

namespace attnserve {

absl::Status RunAtBackgroundPriority(const std::function<absl::Status()>& work) {
  absl::Status result;
  std::thread runner([&] {
    // Per thread on Linux; raising one's own nice needs no privilege (never lowered back: the thread ends).
    (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
    result = work();
  });
  runner.join();
  return result;
}

}  // namespace attnserve
