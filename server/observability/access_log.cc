#include "server/observability/access_log.h"

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log_string.h"

namespace attnserve {
namespace {

// A client string as a JSON string body: bounded and reduced to printable ASCII by BoundedForLog, whose
// output may still hold '"' and the backslashes of its \xNN escapes.
std::string JsonString(absl::string_view s) {
  std::string out;
  for (char c : BoundedForLog(s)) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<AccessLog>> AccessLog::Create(const Options& options) {
  if (options.path.empty()) return absl::InvalidArgumentError("access log: path is empty");
  if (options.max_pending_lines < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("access log: max_pending_lines must be >= 1, got ", options.max_pending_lines));
  }
  std::FILE* file = nullptr;
  if (!options.write_for_test) {
    file = options.path == "-" ? stdout : std::fopen(options.path.c_str(), "a");
    if (file == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("--access-log ", options.path, ": cannot open: ", std::strerror(errno)));
    }
  }
  return std::unique_ptr<AccessLog>(new AccessLog(options, file));
}

AccessLog::AccessLog(const Options& options, std::FILE* file)
    : options_(options), file_(file), writer_([this] { WriterLoop(); }) {}

AccessLog::~AccessLog() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  writer_.join();
  if (file_ != nullptr && file_ != stdout) std::fclose(file_);
}

void AccessLog::Record(AccessRecord record) {
  absl::MutexLock lock(&mu_);
  if (static_cast<int64_t>(pending_.size()) >= options_.max_pending_lines) {
    ++dropped_;
    return;
  }
  pending_.push_back(std::move(record));
}

int64_t AccessLog::dropped() const {
  absl::MutexLock lock(&mu_);
  return dropped_;
}

void AccessLog::WriterLoop() {
  std::vector<AccessRecord> batch;
  while (true) {
    int64_t newly_dropped = 0;
    bool stop = false;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](AccessLog* log) ABSL_EXCLUSIVE_LOCKS_REQUIRED(log->mu_) {
            return log->stopping_ || !log->pending_.empty();
          },
          this));
      batch.swap(pending_);
      newly_dropped = dropped_ - dropped_reported_;
      dropped_reported_ = dropped_;
      stop = stopping_ && batch.empty();
    }
    if (newly_dropped > 0) spdlog::warn("access log: {} lines dropped (the writer was behind)", newly_dropped);
    if (stop) return;
    Write(batch);
    batch.clear();
  }
}

void AccessLog::Write(const std::vector<AccessRecord>& records) {
  std::string lines;
  for (const AccessRecord& r : records) lines += FormatLine(r);
  if (options_.write_for_test) {
    options_.write_for_test(lines);
    return;
  }
  std::fwrite(lines.data(), 1, lines.size(), file_);
  std::fflush(file_);
}

std::string AccessLog::FormatLine(const AccessRecord& r) {
  return absl::StrCat(
      "{\"time\":\"", absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", r.time, absl::UTCTimeZone()), "\",\"rpc\":\"",
      JsonString(r.rpc), "\",\"layer\":\"", JsonString(r.layer), "\",\"version\":", r.version, ",\"id\":\"",
      JsonString(r.id), "\",\"code\":\"", absl::StatusCodeToString(r.code), "\",\"request_bytes\":",
      r.request_bytes, ",\"answer_bytes\":", r.answer_bytes, ",\"total_us\":", r.total_us, ",\"queue_us\":",
      r.queue_us, ",\"compute_us\":", r.compute_us, ",\"batch\":", r.batch, ",\"trace_id\":\"",
      JsonString(r.trace_id), "\",\"span_id\":\"", JsonString(r.span_id), "\"}\n");
}

}  // namespace attnserve
