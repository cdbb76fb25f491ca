#include "common/log_string.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace attnserve {

std::string BoundedForLog(absl::string_view s, size_t max_bytes) {
  std::string out;
  const absl::string_view kept = s.substr(0, max_bytes);
  out.reserve(kept.size() + 16);
  for (const char c : kept) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f && c != '\\') {
      out.push_back(c);
    } else {
      absl::StrAppendFormat(&out, "\\x%02x", u);
    }
  }
  if (s.size() > max_bytes) absl::StrAppend(&out, "...(", s.size(), " bytes)");
  return out;
}

bool LogRateLimiter::Allow(absl::Time now, int64_t* dropped) {
  absl::MutexLock lock(&mu_);
  if (now - window_start_ >= absl::Seconds(1)) {
    window_start_ = now;
    in_window_ = 0;
  }
  if (in_window_ >= lines_per_second_) {
    ++dropped_;
    return false;
  }
  ++in_window_;
  *dropped = dropped_;
  dropped_ = 0;
  return true;
}

}  // namespace attnserve
