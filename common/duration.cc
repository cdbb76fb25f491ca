#include "common/duration.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

absl::Status Bad(absl::string_view what, absl::string_view text) {
  return absl::InvalidArgumentError(absl::StrCat(what, ", got \"", text, "\""));
}

}  // namespace

absl::StatusOr<absl::Duration> ParseDuration(absl::string_view text) {
  absl::Duration d;
  double seconds = 0;
  // Plain numbers are seconds: absl::ParseDuration wants a unit on anything but "0". NaN goes on to
  // absl::ParseDuration, which refuses it (absl::Seconds would make it infinite, hiding the real mistake).
  if (absl::SimpleAtod(text, &seconds) && !std::isnan(seconds)) {
    d = absl::Seconds(seconds);  // saturates: "inf" and "1e400" become infinite, refused below
  } else if (!absl::ParseDuration(text, &d)) {
    return Bad("expected a duration such as \"10s\", \"500ms\", \"2m\" or seconds \"10\"", text);
  }
  if (d == absl::InfiniteDuration() || d == -absl::InfiniteDuration()) return Bad("must be finite", text);
  if (d < absl::ZeroDuration()) return Bad("must not be negative", text);
  return d;
}

}  // namespace attnserve
