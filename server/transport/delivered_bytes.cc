#include "server/transport/delivered_bytes.h"

#include "server/transport/peer_address.h"

namespace attnserve {

DeliveredBytes& DeliveredBytes::Process() {
  static DeliveredBytes* const process = [] {
    auto* table = new DeliveredBytes();  // never destroyed: gRPC threads may outlive main
    table->enabled_.store(false);        // until a reader holds it
    return table;
  }();
  return *process;
}

void DeliveredBytes::Record(absl::string_view grpc_peer, int64_t bytes) {
  if (!enabled_.load(std::memory_order_relaxed)) return;
  std::string key = PeerKeyFromGrpcPeer(grpc_peer);
  if (key.empty()) return;
  absl::MutexLock lock(&mu_);
  Entry& entry = entries_[std::move(key)];
  entry.bytes += bytes;
  entry.round = round_;
}

void DeliveredBytes::AddReader() {
  absl::MutexLock lock(&mu_);
  ++readers_;
  enabled_.store(true, std::memory_order_relaxed);
}

void DeliveredBytes::RemoveReader() {
  absl::MutexLock lock(&mu_);
  if (--readers_ > 0) return;
  readers_ = 0;
  enabled_.store(false, std::memory_order_relaxed);
  entries_.clear();
}

int64_t DeliveredBytes::Of(const std::string& peer_key) const {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(peer_key);
  return it == entries_.end() ? 0 : it->second.bytes;
}

uint64_t DeliveredBytes::BeginPrune() {
  absl::MutexLock lock(&mu_);
  return ++round_;
}

void DeliveredBytes::Prune(uint64_t round, const absl::flat_hash_set<std::string>& live_peer_keys) {
  absl::MutexLock lock(&mu_);
  absl::erase_if(entries_, [&](const auto& kv) {
    return kv.second.round < round && !live_peer_keys.contains(kv.first);
  });
}

size_t DeliveredBytes::size() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
}

}  // namespace attnserve
