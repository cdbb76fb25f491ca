// Watches the config file for changes while the server runs: inotify on the file's directory (so that an
// editor's rename, and a Kubernetes ConfigMap's atomic swap of its `..data` symlink, are seen as well as a
// write in place), plus a check every `check_interval` in case an event was missed. `on_change` gets the
// file's new bytes, once per distinct content, on the watcher's thread; Trigger (SIGHUP) makes it run with
// the current content even when unchanged (the weights files it names may have changed), `triggered` true.
// Content is acted on only once two reads `settle` apart agree, so a file rewritten in place is not read
// half-written.
//
// Thread-safety: Create starts the watching thread; Trigger may be called from any thread; the destructor
// stops the thread (waiting for a running on_change).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace attnserve {

class ConfigWatcher {
 public:
  struct Options {
    std::string path;  // the config file (may be a symlink)
    absl::Duration check_interval = absl::Seconds(2);
    // Events closer than this are read once (an editor's write, rename and chmod).
    absl::Duration settle = absl::Milliseconds(100);
    std::function<void(const std::string& content, bool triggered)> on_change;  // required
  };
  // InvalidArgument without path or on_change, or when the directory cannot be read. Without inotify (its
  // per-user limits used up) it only checks every check_interval (logged).
  static absl::StatusOr<std::unique_ptr<ConfigWatcher>> Create(const Options& options);
  ~ConfigWatcher();
  ConfigWatcher(const ConfigWatcher&) = delete;
  ConfigWatcher& operator=(const ConfigWatcher&) = delete;

  // Runs on_change with the file's current content soon, changed or not.
  void Trigger() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  ConfigWatcher(const Options& options, int inotify_fd, int wake_fd);
  void Run();
  // Reads the file; calls on_change when its content differs from the last seen, or when `force`.
  void Check(bool force);

  const Options options_;
  const int inotify_fd_;  // -1: inotify unavailable, periodic checks only
  const int wake_fd_;  // eventfd: Trigger and the destructor wake the thread
  std::string last_content_;  // only the watcher's thread touches it
  absl::Mutex mu_;
  bool triggered_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace attnserve
