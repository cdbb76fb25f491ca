#include "server/runtime/background_priority.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <exception>
#include <new>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/thread_name.h"

namespace attnserve {

namespace {

absl::Status RunCatching(const std::function<absl::Status()>& work) {
  try {  // an exception on this thread would end the process: a failed load must change nothing
    return work();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory while building the layer");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building the layer failed: ", e.what()));
  }
}

// The one background thread, started on first use and kept for the process's life (never joined: it waits for
// work and holds nothing). Work items run one at a time, in the order their callers got the turn.
class BackgroundThread {
 public:
  static BackgroundThread& Get() {
    static BackgroundThread* const thread = new BackgroundThread();
    return *thread;
  }

  absl::Status Run(const std::function<absl::Status()>& work) {
    if (on_background_thread) return RunCatching(work);  // nested: handing it over would wait on itself
    absl::MutexLock turn(&turn_mu_);
    return HandOver(work);
  }

  bool TryRun(const std::function<absl::Status()>& work) {
    if (on_background_thread) {
      RunCatching(work).IgnoreError();
      return true;
    }
    if (!turn_mu_.TryLock()) return false;
    HandOver(work).IgnoreError();
    turn_mu_.Unlock();
    return true;
  }

 private:
  struct Job {
    const std::function<absl::Status()>* work = nullptr;
    absl::Status result;
    bool done = false;
  };

  absl::Status HandOver(const std::function<absl::Status()>& work) ABSL_EXCLUSIVE_LOCKS_REQUIRED(turn_mu_) {
    Job job;
    job.work = &work;
    absl::MutexLock lock(&mu_);
    job_ = &job;
    mu_.Await(absl::Condition(&job.done));
    return job.result;
  }

  BackgroundThread() {
    std::thread([this] {
      NameThisThread("attn-load");  // its OpenMP team too: layers build and warm up here
      Loop();
    }).detach();
  }

  void Loop() {
    // Per thread on Linux; raising one's own nice needs no privilege.
    (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
    on_background_thread = true;
    for (;;) {
      mu_.LockWhen(absl::Condition(this, &BackgroundThread::HasJob));
      Job* job = job_;
      mu_.Unlock();
      absl::Status result = RunCatching(*job->work);
      absl::MutexLock lock(&mu_);
      job->result = std::move(result);
      job->done = true;
      job_ = nullptr;
    }
  }
  static thread_local bool on_background_thread;
  bool HasJob() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return job_ != nullptr; }

  absl::Mutex turn_mu_;  // held by the caller whose work is handed over or running
  absl::Mutex mu_;
  Job* job_ ABSL_GUARDED_BY(mu_) = nullptr;
};

thread_local bool BackgroundThread::on_background_thread = false;

}  // namespace

absl::Status RunAtBackgroundPriority(const std::function<absl::Status()>& work) {
  return BackgroundThread::Get().Run(work);
}

bool TryRunAtBackgroundPriority(const std::function<absl::Status()>& work) {
  return BackgroundThread::Get().TryRun(work);
}

}  // namespace attnserve
