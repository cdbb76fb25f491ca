// Softmax over the rows of a strided matrix, for the sessions' attention over a KV cache. oneDNN's softmax
// has no runtime dimensions: a primitive per (rows, cols) shape, and a prefill chunk over a growing cache
// meets a new shape every time (building one costs more than the softmax itself).
#pragma once

#include <cstddef>
#include <cstdint>

namespace attnserve {

// In place: each of `rows` rows of `cols` floats (row stride `ld`) becomes exp(x - max) / sum. A -inf entry
// becomes exactly 0; every row must hold at least one finite value. Relative error against float64 below
// 1e-6. Runs on the calling thread; safe to call from many threads on different rows.
void RowSoftmax(float* data, int64_t rows, int64_t cols, int64_t ld);

// The same softmax written as bf16 (rounded to nearest even) to `out` (row stride ld_out), for a bf16
// matmul: one pass fewer than softmax then conversion. `data` is left holding unnormalised exponentials.
// Rows with dead[r] != 0 (`dead` may be null) are written as zeros and not read: rows whose keys are all masked.
void RowSoftmaxToBf16(float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead, uint16_t* out,
                      int64_t ld_out);

}  // namespace attnserve
