#include "tools/attnbench_histogram.h"

#include <algorithm>
#include <cmath>

namespace attnserve {
namespace {

constexpr int kSubBits = 7;                   // 128 sub-buckets per power of two
constexpr int64_t kSub = int64_t{1} << kSubBits;
constexpr int64_t kExact = 2 * kSub;          // values below 256 get a bucket each
constexpr int kTopBit = 62;                   // int64 values have their highest set bit at 62 at most
constexpr int kBuckets = static_cast<int>(kExact + (kTopBit - kSubBits) * kSub);

int HighestBit(uint64_t v) { return 63 - __builtin_clzll(v); }

}  // namespace

LatencyHistogram::LatencyHistogram() : buckets_(kBuckets, 0) {}

int LatencyHistogram::BucketIndex(int64_t value) {
  if (value < kExact) return static_cast<int>(std::max<int64_t>(value, 0));
  const int msb = HighestBit(static_cast<uint64_t>(value));  // >= 8
  const int shift = msb - kSubBits;
  const int64_t sub = (value >> shift) - kSub;  // in [0, 128)
  return static_cast<int>(kExact + (msb - kSubBits - 1) * kSub + sub);
}

int64_t LatencyHistogram::BucketLowest(int index) {
  if (index < kExact) return index;
  const int64_t rel = index - kExact;
  const int msb = static_cast<int>(rel / kSub) + kSubBits + 1;
  const int64_t sub = rel % kSub;
  return (kSub + sub) << (msb - kSubBits);
}

int64_t LatencyHistogram::BucketHighest(int index) {
  if (index < kExact) return index;
  const int64_t rel = index - kExact;
  const int msb = static_cast<int>(rel / kSub) + kSubBits + 1;
  return BucketLowest(index) + ((int64_t{1} << (msb - kSubBits)) - 1);  // no overflow at the top bucket
}

void LatencyHistogram::Record(int64_t value) {
  value = std::max<int64_t>(value, 0);
  ++buckets_[BucketIndex(value)];
  min_ = count_ == 0 ? value : std::min(min_, value);
  max_ = std::max(max_, value);
  sum_ += value;
  ++count_;
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  if (other.count_ == 0) return;
  for (size_t i = 0; i < buckets_.size(); ++i) buckets_[i] += other.buckets_[i];
  min_ = count_ == 0 ? other.min_ : std::min(min_, other.min_);
  max_ = std::max(max_, other.max_);
  sum_ += other.sum_;
  count_ += other.count_;
}

int64_t LatencyHistogram::Percentile(double p) const {
  if (count_ == 0) return 0;
  p = std::clamp(p, 0.0, 100.0);
  // The rank (1-based) of the value at p: ceil(p% of count), at least the first.
  const int64_t rank = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(p / 100.0 * static_cast<double>(count_))));
  int64_t seen = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    seen += buckets_[i];
    if (seen >= rank) return std::clamp(BucketHighest(static_cast<int>(i)), min_, max_);
  }
  return max_;
}

}  // namespace attnserve
