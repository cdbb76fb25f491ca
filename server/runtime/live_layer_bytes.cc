#include "server/runtime/live_layer_bytes.h"

#include <atomic>
#include <utility>

namespace attnserve {

namespace {

std::atomic<int64_t>& Total() {
  static std::atomic<int64_t> total{0};
  return total;
}

}  // namespace

int64_t LiveLayerWeightBytes() { return Total().load(std::memory_order_relaxed); }

LiveLayerBytes::LiveLayerBytes(int64_t bytes) : bytes_(bytes) {
  Total().fetch_add(bytes_, std::memory_order_relaxed);
}

LiveLayerBytes::LiveLayerBytes(LiveLayerBytes&& other) noexcept : bytes_(std::exchange(other.bytes_, 0)) {}

LiveLayerBytes& LiveLayerBytes::operator=(LiveLayerBytes&& other) noexcept {
  if (this != &other) {
    Total().fetch_sub(bytes_, std::memory_order_relaxed);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

LiveLayerBytes::~LiveLayerBytes() { Total().fetch_sub(bytes_, std::memory_order_relaxed); }

}  // namespace attnserve
