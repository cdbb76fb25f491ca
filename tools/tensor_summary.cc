#include "tools/tensor_summary.h"

#include <algorithm>
#include <cmath>

namespace attnserve {

ValueSummary SummarizeValues(absl::Span<const float> values) {
  ValueSummary s;
  s.count = static_cast<int64_t>(values.size());
  int64_t finite = 0;
  double sum = 0, sum_sq = 0;
  for (float v : values) {
    if (std::isnan(v)) {
      ++s.nan_count;
    } else if (std::isinf(v)) {
      ++s.inf_count;
    } else {
      s.min = finite == 0 ? v : std::min<double>(s.min, v);
      s.max = finite == 0 ? v : std::max<double>(s.max, v);
      sum += v;
      sum_sq += static_cast<double>(v) * v;
      ++finite;
    }
  }
  if (finite > 0) {
    s.mean = sum / static_cast<double>(finite);
    s.std = std::sqrt(std::max(0.0, sum_sq / static_cast<double>(finite) - s.mean * s.mean));
  }
  return s;
}

}  // namespace attnserve
