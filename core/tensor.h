// Dense row-major tensors as the engine sees them: non-owning views for inputs (so the server can hand
// the engine bytes that live in a protobuf message without a copy) and an owning f32 tensor for outputs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/types/span.h"

namespace attnserve {

// kBFloat16 and kFloat16 are 16-bit floats as they arrive on the wire (little-endian bit patterns): the
// engines take them as query, key and value and convert them while gathering a batch (core/activation_rows.h).
enum class DType { kFloat32, kBool, kInt64, kBFloat16, kFloat16 };

const char* DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

using Shape = std::vector<int64_t>;

// "[2, 16, 256]".
std::string ShapeToString(absl::Span<const int64_t> shape);
// Product of the dims (1 for a scalar shape []). Dims must be non-negative.
int64_t NumElements(absl::Span<const int64_t> shape);

// A read-only view of caller-owned row-major data; `data` may be unaligned and must outlive the view.
// A default-constructed view (data == nullptr, empty shape) means "absent".
struct TensorView {
  DType dtype = DType::kFloat32;
  Shape shape;
  const void* data = nullptr;

  bool present() const { return data != nullptr || !shape.empty(); }
  int64_t num_elements() const { return NumElements(shape); }
  size_t num_bytes() const { return static_cast<size_t>(num_elements()) * DTypeSize(dtype); }

  static TensorView F32(const float* data, Shape shape) { return {DType::kFloat32, std::move(shape), data}; }
  // Bool values are one byte each, 0 = false, anything else = true.
  static TensorView Bool(const uint8_t* data, Shape shape) { return {DType::kBool, std::move(shape), data}; }
  static TensorView I64(const int64_t* data, Shape shape) { return {DType::kInt64, std::move(shape), data}; }
};

// Asks for transparent huge pages over the 2 MiB-aligned interior of [data, data + bytes) when it holds at least
// two of them (advice: the kernel may decline). For large buffers before their first touch.
void AdviseHugePages(void* data, size_t bytes);

// Takes the advice back (MADV_NOHUGEPAGE over the same interior) before such a buffer is freed. The advice belongs
// to the address range, not the allocation: on memory malloc keeps in a heap it would outlive the buffer, and
// khugepaged could then fault in whole 2 MiB pages around the few 4 KiB pages the heap's next blocks touch.
void UnadviseHugePages(void* data, size_t bytes);

// An owning, row-major f32 tensor.
struct Tensor {
  Shape shape;
  std::vector<float> values;

  Tensor() = default;
  // Zeros of `shape`; a large one on transparent huge pages where the kernel allows them (AdviseHugePages): 4 KiB
  // pages fault in one by one, which on a VM costs more than the matmul that fills an output (a fresh 32 MiB
  // output: 90 ms on 4 KiB pages, 8 ms on huge pages; BENCHMARKS.md, sixteenth session).
  explicit Tensor(Shape s);
  Tensor(Shape s, std::vector<float> v) : shape(std::move(s)), values(std::move(v)) {}
  Tensor(const Tensor&) = default;
  Tensor(Tensor&&) noexcept = default;
  // Both take this tensor's advice back before its values are replaced; so does the destructor, before they are
  // freed. (A caller that reallocates `values` itself frees the old ones advised: do not, on a large tensor.)
  Tensor& operator=(const Tensor& other);
  Tensor& operator=(Tensor&& other) noexcept;
  ~Tensor();

  TensorView view() const { return TensorView::F32(values.data(), shape); }
  static Tensor Zeros(Shape shape) { return Tensor(std::move(shape)); }
  int64_t num_elements() const { return NumElements(shape); }
};

}  // namespace attnserve
