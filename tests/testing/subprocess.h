// A child process for integration tests: started with fork/exec, its stdout and stderr going to a log file
// that the test can read and wait on, signalled, waited for. The destructor SIGKILLs and reaps a child that
// is still running, so a failing test never leaves a server behind.
//
// Thread-safety: one Subprocess is used from one thread at a time, except ReadLog, WaitForLog and
// WaitForLogRegex, which only read the log file and may run concurrently with anything.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace attnserve::testing {

class Subprocess {
 public:
  // Runs args[0] (a path; PATH is not searched) with argv = args, stdin from /dev/null, stdout and stderr
  // appended to a fresh (truncated) `log_path`. The child gets an unblocked signal mask and default
  // dispositions for every signal, file descriptors beyond 2 are not inherited, and it is SIGKILLed if the
  // thread that called Start exits (PR_SET_PDEATHSIG), so call Start from a thread that outlives the child
  // (the test's main thread). Errors: InvalidArgument for empty args, the errno-derived code when the log
  // cannot be opened, fork fails or exec fails (e.g. NotFound for a missing binary).
  static absl::StatusOr<std::unique_ptr<Subprocess>> Start(const std::vector<std::string>& args,
                                                           const std::string& log_path);

  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;
  // SIGKILLs the child if it has not been reaped yet, then reaps it.
  ~Subprocess();

  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }

  // The whole log so far ("" if it cannot be read).
  std::string ReadLog() const;

  // Polls the log until it contains `needle`. DeadlineExceeded after `timeout`; FailedPrecondition when the
  // child exits first (checked after a last look at the log). Both messages end with the log's tail.
  absl::Status WaitForLog(const std::string& needle, absl::Duration timeout);

  // Same with an ECMAScript regex; returns the first match's groups (index 0: the whole match).
  absl::StatusOr<std::vector<std::string>> WaitForLogRegex(const std::string& regex, absl::Duration timeout);

  // kill(pid, signal). FailedPrecondition once the child has been reaped.
  absl::Status Signal(int signal);

  // True until the child has exited (reaps it when it has).
  bool Running();

  // Waits for the child to exit and returns its exit code, or -N when signal N killed it.
  // DeadlineExceeded after `timeout` (the child is left running).
  absl::StatusOr<int> WaitForExit(absl::Duration timeout);

  // The last `max_bytes` of the log, for failure messages.
  std::string LogTail(size_t max_bytes = 4000) const;

 private:
  Subprocess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}
  // waitpid(WNOHANG) once; true when the child is (now) reaped.
  bool Reap(bool block);

  pid_t pid_;
  std::string log_path_;
  bool reaped_ = false;
  int wait_status_ = 0;
};

}  // namespace attnserve::testing
