#include "server/startup/config_watcher.h"

#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iterator>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "common/thread_name.h"

namespace attnserve {
namespace {

std::string DirectoryOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// The file's bytes; empty when it cannot be read (mid-swap), which is not treated as a change.
std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void Drain(int fd) {
  char buf[4096];
  while (read(fd, buf, sizeof(buf)) > 0) {
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<ConfigWatcher>> ConfigWatcher::Create(const Options& options) {
  if (options.path.empty() || !options.on_change) {
    return absl::InvalidArgumentError("ConfigWatcher: path and on_change are required");
  }
  const std::string dir = DirectoryOf(options.path);
  if (access(dir.c_str(), R_OK | X_OK) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("config file directory ", dir, ": ", std::strerror(errno)));
  }
  const int wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd < 0) return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
  int inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  const uint32_t events = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ATTRIB | IN_MODIFY;
  if (inotify_fd < 0 || inotify_add_watch(inotify_fd, dir.c_str(), events) < 0) {
    // The per-user inotify limits are often used up on busy nodes: the periodic check still sees changes.
    spdlog::warn("config watcher: inotify unavailable ({}); checking {} every {}", std::strerror(errno), options.path,
                 absl::FormatDuration(options.check_interval));
    if (inotify_fd >= 0) close(inotify_fd);
    inotify_fd = -1;
  }
  return std::unique_ptr<ConfigWatcher>(new ConfigWatcher(options, inotify_fd, wake_fd));
}

ConfigWatcher::ConfigWatcher(const Options& options, int inotify_fd, int wake_fd)
    : options_(options), inotify_fd_(inotify_fd), wake_fd_(wake_fd), last_content_(ReadAll(options.path)) {
  thread_ = std::thread([this] {
    NameThisThread("attn-config");
    Run();
  });
}

ConfigWatcher::~ConfigWatcher() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  const uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
  thread_.join();
  if (inotify_fd_ >= 0) close(inotify_fd_);
  close(wake_fd_);
}

void ConfigWatcher::Trigger() {
  {
    absl::MutexLock lock(&mu_);
    triggered_ = true;
  }
  const uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
}

void ConfigWatcher::Check(bool force) {
  std::string content = ReadAll(options_.path);
  if (content.empty() || (!force && content == last_content_)) return;
  // A file rewritten in place may be read half-written: act only on content that stayed the same for a while.
  absl::SleepFor(options_.settle);
  if (ReadAll(options_.path) != content) return;  // still changing: the next event or check reads it again
  last_content_ = content;
  options_.on_change(content, force);
}

void ConfigWatcher::Run() {
  pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {inotify_fd_, POLLIN, 0}};
  const nfds_t watched = inotify_fd_ >= 0 ? 2 : 1;
  while (true) {
    const int ready = poll(fds, watched, static_cast<int>(absl::ToInt64Milliseconds(options_.check_interval)));
    if (ready > 0 && watched == 2 && (fds[1].revents & POLLIN)) {
      absl::SleepFor(options_.settle);  // let the rest of a write-and-rename arrive
      Drain(inotify_fd_);
    }
    if (ready > 0 && (fds[0].revents & POLLIN)) Drain(wake_fd_);
    bool force = false;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      force = triggered_;
      triggered_ = false;
    }
    Check(force);
  }
}

}  // namespace attnserve
