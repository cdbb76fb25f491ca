#include "server/observability/layer_statistics.h"

#include <limits>

namespace attnserve {
namespace {

uint64_t Nanos(absl::Duration d) { return d > absl::ZeroDuration() ? absl::ToInt64Nanoseconds(d) : 0; }

}  // namespace

VersionStatistics& LayerStatistics::EntryLocked(const std::string& layer, int64_t version) {
  auto [it, added] = versions_.try_emplace({layer, version});
  VersionStatistics& entry = it->second;
  if (!added) return entry;
  entry.layer = layer;
  entry.version = version;
  const auto first = versions_.lower_bound({layer, std::numeric_limits<int64_t>::min()});
  int kept = 0;
  for (auto i = first; i != versions_.end() && i->first.first == layer; ++i) ++kept;
  // The one added may be the oldest (a request that finished long after 16 reloads): it goes next time.
  if (kept > kVersionsKept && first != it) versions_.erase(first);
  return entry;
}

void LayerStatistics::RequestDone(const std::string& layer, int64_t version, bool ok, absl::Duration total,
                                  absl::Duration queue, absl::Duration compute, int64_t sequences, absl::Time now) {
  absl::MutexLock lock(&mu_);
  VersionStatistics& entry = EntryLocked(layer, version);
  entry.last_inference = now;
  if (!ok) {
    entry.fail.Add(Nanos(total));
    return;
  }
  entry.success.Add(Nanos(total));
  entry.queue.Add(Nanos(queue));
  entry.compute.Add(Nanos(compute));
  entry.inference_count += static_cast<uint64_t>(sequences);
}

void LayerStatistics::BatchDone(const std::string& layer, int64_t version, int requests, absl::Duration compute) {
  absl::MutexLock lock(&mu_);
  VersionStatistics& entry = EntryLocked(layer, version);
  ++entry.execution_count;
  entry.batches[requests].Add(Nanos(compute));
}

std::vector<VersionStatistics> LayerStatistics::Snapshot(const std::string& layer, int64_t version) const {
  absl::MutexLock lock(&mu_);
  std::vector<VersionStatistics> out;
  for (const auto& [key, entry] : versions_) {
    if (!layer.empty() && key.first != layer) continue;
    if (version != 0 && key.second != version) continue;
    out.push_back(entry);
  }
  return out;
}

}  // namespace attnserve
