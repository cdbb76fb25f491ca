#include "tests/testing/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace attnserve::testing {
namespace {

constexpr absl::Duration kPollInterval = absl::Milliseconds(5);

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

// Only async-signal-safe calls from here on: the parent has other threads.
[[noreturn]] void ExecChild(char* const* argv, int log_fd, int null_fd, int error_fd, pid_t parent) {
  int err = 0;
  // Dies with the thread that started it, so a crashed test leaves nothing behind.
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) _exit(127);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) sigaction(sig, &dfl, nullptr);  // fails harmlessly for KILL/STOP
  if (dup2(null_fd, STDIN_FILENO) < 0 || dup2(log_fd, STDOUT_FILENO) < 0 || dup2(log_fd, STDERR_FILENO) < 0) {
    err = errno;
  } else {
    // Nothing of the parent's beyond 0..2 crosses exec (error_fd is already close-on-exec).
    syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC);
    execv(argv[0], argv);
    err = errno;
  }
  ssize_t unused = write(error_fd, &err, sizeof(err));
  (void)unused;
  _exit(127);
}

absl::Status ErrnoStatus(int err, const std::string& what) {
  return absl::ErrnoToStatus(err, what);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Start(const std::vector<std::string>& args,
                                                              const std::string& log_path) {
  if (args.empty()) return absl::InvalidArgumentError("Subprocess::Start: args must not be empty");
  std::vector<std::string> owned = args;
  std::vector<char*> argv;
  for (std::string& a : owned) argv.push_back(a.data());
  argv.push_back(nullptr);

  const int log_fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return ErrnoStatus(errno, absl::StrCat("open ", log_path));
  const int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null_fd < 0) {
    const int err = errno;
    close(log_fd);
    return ErrnoStatus(err, "open /dev/null");
  }
  int error_pipe[2];
  if (pipe2(error_pipe, O_CLOEXEC) != 0) {
    const int err = errno;
    close(log_fd);
    close(null_fd);
    return ErrnoStatus(err, "pipe2");
  }

  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid == 0) ExecChild(argv.data(), log_fd, null_fd, error_pipe[1], parent);
  const int fork_errno = errno;
  close(log_fd);
  close(null_fd);
  close(error_pipe[1]);
  if (pid < 0) {
    close(error_pipe[0]);
    return ErrnoStatus(fork_errno, "fork");
  }

  // The pipe closes on a successful exec (close-on-exec) with nothing written; a failure writes errno.
  int child_errno = 0;
  ssize_t n;
  do {
    n = read(error_pipe[0], &child_errno, sizeof(child_errno));
  } while (n < 0 && errno == EINTR);
  close(error_pipe[0]);
  std::unique_ptr<Subprocess> process(new Subprocess(pid, log_path));
  if (n == sizeof(child_errno)) {
    process->Reap(/*block=*/true);
    return ErrnoStatus(child_errno, absl::StrCat("exec ", args[0]));
  }
  return process;
}

Subprocess::~Subprocess() {
  if (!reaped_) {
    kill(pid_, SIGKILL);
    Reap(/*block=*/true);
  }
}

bool Subprocess::Reap(bool block) {
  if (reaped_) return true;
  int status = 0;
  pid_t r;
  do {
    r = waitpid(pid_, &status, block ? 0 : WNOHANG);
  } while (r < 0 && errno == EINTR);
  if (r == pid_) {
    reaped_ = true;
    wait_status_ = status;
  } else if (r < 0) {
    reaped_ = true;  // ECHILD: someone else reaped it; nothing left to wait for
    wait_status_ = 0;
  }
  return reaped_;
}

std::string Subprocess::ReadLog() const {
  std::ifstream in(log_path_, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string Subprocess::LogTail(size_t max_bytes) const {
  std::string log = ReadLog();
  if (log.size() > max_bytes) log = "..." + log.substr(log.size() - max_bytes);
  return log;
}

absl::Status Subprocess::WaitForLog(const std::string& needle, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const bool exited = !Running();
    if (ReadLog().find(needle) != std::string::npos) return absl::OkStatus();
    if (exited) {
      return absl::FailedPreconditionError(
          absl::StrCat("process ", pid_, " exited before its log showed '", needle, "'; log:\n", LogTail()));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("log of process ", pid_, " did not show '", needle,
                                                      "' within ", absl::FormatDuration(timeout), "; log:\n",
                                                      LogTail()));
    }
    absl::SleepFor(kPollInterval);
  }
}

absl::StatusOr<std::vector<std::string>> Subprocess::WaitForLogRegex(const std::string& regex,
                                                                      absl::Duration timeout) {
  std::regex re;
  try {
    re = std::regex(regex, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("bad regex '", regex, "': ", e.what()));
  }
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const bool exited = !Running();
    const std::string log = ReadLog();
    std::smatch m;
    if (std::regex_search(log, m, re)) {
      std::vector<std::string> groups;
      for (const auto& g : m) groups.push_back(g.str());
      return groups;
    }
    if (exited) {
      return absl::FailedPreconditionError(absl::StrCat("process ", pid_, " exited before its log matched /",
                                                        regex, "/; log:\n", LogTail()));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("log of process ", pid_, " did not match /", regex,
                                                      "/ within ", absl::FormatDuration(timeout), "; log:\n",
                                                      LogTail()));
    }
    absl::SleepFor(kPollInterval);
  }
}

absl::Status Subprocess::Signal(int signal) {
  if (reaped_) return absl::FailedPreconditionError(absl::StrCat("process ", pid_, " has already exited"));
  if (kill(pid_, signal) != 0) return ErrnoStatus(errno, absl::StrCat("kill ", pid_));
  return absl::OkStatus();
}

bool Subprocess::Running() { return !Reap(/*block=*/false); }

absl::StatusOr<int> Subprocess::WaitForExit(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!Reap(/*block=*/false)) {
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("process ", pid_, " still running after ", absl::FormatDuration(timeout)));
    }
    absl::SleepFor(kPollInterval);
  }
  if (WIFEXITED(wait_status_)) return WEXITSTATUS(wait_status_);
  if (WIFSIGNALED(wait_status_)) return -WTERMSIG(wait_status_);
  return -1;
}

}  // namespace attnserve::testing
