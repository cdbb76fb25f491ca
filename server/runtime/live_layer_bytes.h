// How many bytes of weights the layers alive in this process hold, whether published, replaced but still
// answering, or being built: what loading and freeing layers after start moves the RSS by. The memory guard
// moves its limit with it (memory_guard.h), so that a layer loaded while serving is not taken for a flood and
// a layer freed does not leave its bytes to one.
//
// Thread-safety: every function and LiveLayerBytes's members may be called from any thread.
#pragma once

#include <cstdint>

namespace attnserve {

// The sum of every LiveLayerBytes alive in the process.
int64_t LiveLayerWeightBytes();

// Counts `bytes` in LiveLayerWeightBytes() from construction to destruction (ServedLayer holds one for its
// engine's weights). Movable: the count moves with it.
class LiveLayerBytes {
 public:
  LiveLayerBytes() = default;
  explicit LiveLayerBytes(int64_t bytes);
  LiveLayerBytes(LiveLayerBytes&& other) noexcept;
  LiveLayerBytes& operator=(LiveLayerBytes&& other) noexcept;
  LiveLayerBytes(const LiveLayerBytes&) = delete;
  LiveLayerBytes& operator=(const LiveLayerBytes&) = delete;
  ~LiveLayerBytes();

  int64_t bytes() const { return bytes_; }

 private:
  int64_t bytes_ = 0;
};

}  // namespace attnserve
