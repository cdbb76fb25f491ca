// A log-linear histogram of non-negative integers (attnbench records latencies in nanoseconds and server
// times in microseconds): values below 256 are kept exactly, larger ones in buckets 1/128 of their power of
// two wide, so a percentile is within 0.8% of the recorded value whatever the range, in fixed memory, and
// histograms from many threads merge exactly. Count, sum, min and max are exact.
//
// Thread-safety: none; callers lock (attnbench's StepRecorder does).
#pragma once

#include <cstdint>
#include <vector>

namespace attnserve {

class LatencyHistogram {
 public:
  LatencyHistogram();

  // Negative values are recorded as 0.
  void Record(int64_t value);
  void Merge(const LatencyHistogram& other);

  int64_t count() const { return count_; }
  int64_t min() const { return count_ == 0 ? 0 : min_; }
  int64_t max() const { return max_; }
  double mean() const { return count_ == 0 ? 0.0 : static_cast<double>(sum_) / static_cast<double>(count_); }

  // The value at percentile `p` in [0, 100]: the smallest recorded value v such that at least p% of the
  // values are <= v, given as its bucket's upper bound (clamped to [min, max]); 0 when empty.
  int64_t Percentile(double p) const;

  // Bucket arithmetic, exposed for tests: the bucket of a value and the value range of a bucket.
  static int BucketIndex(int64_t value);
  static int64_t BucketLowest(int index);
  static int64_t BucketHighest(int index);

 private:
  std::vector<int64_t> buckets_;
  int64_t count_ = 0;
  int64_t sum_ = 0;
  int64_t min_ = 0;
  int64_t max_ = 0;
};

}  // namespace attnserve
