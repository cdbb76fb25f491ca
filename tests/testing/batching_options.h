// BatchingOptions in one line, for the batcher's tests.
#pragma once

#include <cstdint>

#include "server/batching/batch_queue.h"

namespace attnserve::testing {

inline BatchingOptions Opts(int32_t max_batch_size, int64_t max_queue_delay_us, int32_t max_queue_size = 1024,
                            int64_t max_batch_tokens = 8192) {
  BatchingOptions o;
  o.max_batch_size = max_batch_size;
  o.max_queue_delay_us = max_queue_delay_us;
  o.max_queue_size = max_queue_size;
  o.max_batch_tokens = max_batch_tokens;
  return o;
}

}  // namespace attnserve::testing
