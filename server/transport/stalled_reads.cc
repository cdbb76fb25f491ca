#include "server/transport/stalled_reads.h"

#include "absl/container/flat_hash_set.h"

namespace attnserve {

std::vector<size_t> StalledReads::Check(const std::vector<TcpConnection>& connections,
                                        const std::vector<int64_t>& delivered_bytes, absl::Time now) {
  std::vector<size_t> stalled;
  absl::flat_hash_set<uint64_t> seen;
  for (size_t i = 0; i < connections.size(); ++i) {
    const TcpConnection& c = connections[i];
    seen.insert(c.inode);
    const auto found = stalls_.find(c.inode);
    if (c.unread_bytes < options_.min_unread_bytes) {
      // Read down: not stalled, unless it is the one read that a slow parse does now and then, between two
      // checks that find the queue full again.
      if (found != stalls_.end() && ++found->second.misses >= 2) stalls_.erase(found);
      continue;
    }
    const auto [it, first] = stalls_.try_emplace(c.inode, Stall{now, delivered_bytes[i], 0});
    if (!first && it->second.delivered != delivered_bytes[i]) {
      it->second = Stall{now, delivered_bytes[i], 0};  // a message arrived: its bytes are being read
      continue;
    }
    it->second.misses = 0;
    if (now - it->second.since < options_.stall_duration) continue;
    stalled.push_back(i);
    stalls_.erase(it);
  }
  absl::erase_if(stalls_, [&](const auto& entry) { return !seen.contains(entry.first); });
  return stalled;
}

}  // namespace attnserve
