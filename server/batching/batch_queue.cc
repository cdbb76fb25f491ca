// BatchQueue is a template, in the header; BatchingOptions::Validate lives here.
#include "server/batching/batch_queue.h"

#include "absl/strings/str_cat.h"

namespace attnserve {

absl::Status BatchingOptions::Validate() const {
  if (max_batch_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch_size must be >= 1, got ", max_batch_size));
  }
  if (max_queue_delay_us < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_queue_delay_us must be >= 0 (0 = eager), got ", max_queue_delay_us));
  }
  if (max_queue_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_queue_size must be >= 1, got ", max_queue_size));
  }
  if (max_batch_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch_tokens must be >= 1, got ", max_batch_tokens));
  }
  return absl::OkStatus();
}

}  // namespace attnserve
