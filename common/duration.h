// The one duration syntax of attnserve's command lines (the server's --shutdown-grace, attnbench's
// --duration and --warmup), so the same text means the same time everywhere.
#pragma once

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace attnserve {

// "10s", "500ms", "2m", "1m30s" (absl::ParseDuration's units), or plain seconds "10" / "1.5". The result
// is finite and >= 0. InvalidArgument otherwise, whose message ends in `got "TEXT"`:
//   expected a duration such as "10s", "500ms", "2m" or seconds "10", got "soon"
//   must be finite, got "inf"
//   must not be negative, got "-5s"
// Callers prefix where the text came from (a flag or a variable).
absl::StatusOr<absl::Duration> ParseDuration(absl::string_view text);

}  // namespace attnserve
