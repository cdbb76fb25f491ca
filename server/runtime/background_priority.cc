#include "server/runtime/background_priority.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <exception>
#include <new>
#include <thread>

#include "absl/strings/str_cat.h"

namespace attnserve {

absl::Status RunAtBackgroundPriority(const std::function<absl::Status()>& work) {
  absl::Status result;
  std::thread runner([&] {
    // Per thread on Linux; raising one's own nice needs no privilege (never lowered back: the thread ends).
    (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
    try {  // an exception on this thread would end the process: a failed load must change nothing
      result = work();
    } catch (const std::bad_alloc&) {
      result = absl::ResourceExhaustedError("out of memory while building the layer");
    } catch (const std::exception& e) {
      result = absl::InternalError(absl::StrCat("building the layer failed: ", e.what()));
    }
  });
  runner.join();
  return result;
}

}  // namespace attnserve
