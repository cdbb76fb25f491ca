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

// In place: each of `rows` rows of `cols` floats (row stride `ld`) becomes cap * tanh(x / cap) (a logit soft cap,
// Gemma 2's; cap > 0), vectorised: within 5e-7 relative of float64 tanh's (3.6e-7 measured), +-inf give +-cap and
// NaN stays NaN. Runs on the calling thread.
void SoftCapRows(float* data, int64_t rows, int64_t cols, int64_t ld, float cap);

// The same softmax written as bf16 (rounded to nearest even) to `out` (row stride ld_out), for a bf16
// matmul: one pass fewer than softmax then conversion. `data` is scratch: its rows may be left holding
// unnormalised exponentials, or as they were (up to 256 keys on AVX-512: row_softmax_avx512.h).
// Rows with dead[r] != 0 (`dead` may be null) are written as zeros and not read: rows whose keys are all masked.
void RowSoftmaxToBf16(float* data, int64_t rows, int64_t cols, int64_t ld, const uint8_t* dead, uint16_t* out,
                      int64_t ld_out);

// One key block of an online (flash-style) softmax, over `rows` rows of scores (row stride ld, `cols` keys).
// Row r keeps its first open(r) = clamp(open0 + r, 0, cols) keys (the causal diagonal; open0 >= cols keeps
// every key) and the rest become 0. With m = max(row_max[r], the row's largest open score), the open scores
// become exp(s - m); row_sum[r] = row_sum[r] * exp(row_max[r] - m) + their sum; the accumulated context
// row r of `acc` (`acc_cols` floats, row stride ld_acc) is scaled by exp(row_max[r] - m) (not touched while
// row_max[r] is -inf: nothing accumulated yet); row_max[r] = m. A row with no open key, or whose open scores
// are all -inf, becomes zeros and leaves its state as it was. Start with row_max = -inf, row_sum = 0 and
// acc = 0. Runs on the calling thread.
void OnlineSoftmaxBlock(float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t open0, float* row_max,
                        float* row_sum, float* acc, int64_t acc_cols, int64_t ld_acc);

// One row's running state after a key block of the online softmax, its open scores already exp(s - block_max):
// block_max is the new running max (>= *row_max, not -inf) and block_sum the sum of those exponentials.
// *row_sum = *row_sum * exp(*row_max - block_max) + block_sum, the row's context (acc_cols floats) scaled by
// the same factor (not touched while *row_max is -inf: nothing accumulated yet), *row_max = block_max.
void FoldBlockIntoRow(float block_max, float block_sum, float* row_max, float* row_sum, float* acc_row,
                      int64_t acc_cols);

}  // namespace attnserve
