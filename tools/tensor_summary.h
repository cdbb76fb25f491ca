// Summary statistics of a tensor's values, for attnctl's report (a shell user wants to see at a glance that
// an output is sane: its scale, and no NaN or Inf).
#pragma once

#include <cstdint>

#include "absl/types/span.h"

namespace attnserve {

struct ValueSummary {
  int64_t count = 0;
  int64_t nan_count = 0;
  int64_t inf_count = 0;
  // Over the finite values only (0 when there are none); std is the population standard deviation.
  double mean = 0, std = 0, min = 0, max = 0;
};

ValueSummary SummarizeValues(absl::Span<const float> values);

}  // namespace attnserve
