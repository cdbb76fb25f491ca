// FlashAttention's bf16 block matmuls as strip kernels on AVX512_BF16 (vdpbf16ps: two bf16 products summed into
// each f32 lane), for bf16 layers where oneDNN has no AMX: the f32 strip path's layout (core/flash_strips_avx512.h)
// with its operands in bf16 pairs. oneDNN 2.6's AVX512_BF16 brgemm blocks copy every query block dense, run a
// [query_rows, key_cols] scores block through the L2 cache and round it to bf16 in a pass of its own.
//
// A head's keys are packed once per (sequence, head) as panels of 16 keys whose head dimensions come in pairs
// (one register: 16 keys x 2 dims, against a broadcast pair of Q), its values as pairs of keys (one register: 16
// dims x 2 keys, against a broadcast pair of probabilities). A strip's probabilities are rounded to bf16 (as the
// brgemm blocks round theirs, though from exponentials within 3e-6 of exact where theirs are within float rounding)
// by its online softmax step, which writes them straight to the context's operand. Products accumulate in f32.
//
// Every function runs on the calling thread and is safe to call from many threads on different outputs. Call
// them only where FlashBf16StripsAvailable(head_dim).
#pragma once

#include <cstdint>

namespace attnserve {

// Whether the CPU has AVX512_BF16, ATTNSERVE_MAX_KERNEL_ISA allows AVX-512, and 1 <= head_dim <= 128.
bool FlashBf16StripsAvailable(int64_t head_dim);

// Elements PackKeyPairPanels writes: keys rounded up to 16, times head_dim rounded up to 2.
int64_t PackedKeyPairElems(int64_t keys, int64_t head_dim);

// bf16 keys [keys, Dh] (row stride ld) as panels of 16 keys, each [Dh2 / 2][16][2], Dh2 = Dh rounded up to 2: key
// j's element d at panels[(j / 16) * 16 * Dh2 + (d / 2) * 32 + (j % 16) * 2 + d % 2]. Padding (keys past num_keys,
// the odd head's last dimension) is zero.
void PackKeyPairPanels(const uint16_t* keys, int64_t num_keys, int64_t ld, int64_t head_dim, uint16_t* panels);

// Elements PackValuePairs writes: keys rounded up to 2, times head_dim rounded up to 16.
int64_t PackedValuePairElems(int64_t keys, int64_t head_dim);

// bf16 values [keys, Dh] (row stride ld) as pairs of keys, each [Dh16][2], Dh16 = Dh rounded up to 16: value j's
// element d at pairs[(j / 2) * 2 * Dh16 + d * 2 + j % 2]. Padding is zero.
void PackValuePairs(const uint16_t* values, int64_t num_keys, int64_t ld, int64_t head_dim, uint16_t* pairs);

// scores [rows, cols] f32 (row stride ld_scores) = Q [rows, Dh] bf16 (row stride ld_q) . K^T, K being keys
// [k0, k0 + cols) of `panels` (PackKeyPairPanels). 1 <= rows <= kFlashStripRows; k0 a multiple of 16. Reads
// exactly Q's rows x Dh elements; writes exactly rows x cols floats.
void StripScoresBf16(const uint16_t* q, int64_t ld_q, int64_t rows, const uint16_t* panels, int64_t k0, int64_t cols,
                     int64_t head_dim, float* scores, int64_t ld_scores);

// StripOnlineSoftmax (core/flash_strips_avx512.h) with the probabilities written to probs16 [rows, cols2] bf16
// (row stride ld16) instead of over the scores: rounded to nearest even, cols2 = cols rounded up to 2, the pad
// column zero (StripAddContextBf16 reads whole pairs). Its exponentials are ExpNonPositiveForBf16Avx512's (within
// 3e-6 of exp, core/exp_avx512.h): StripOnlineSoftmax's maxima and context rescaling bit for bit, its sums within
// 1e-5, its probabilities rounded to the nearest bf16 within that accuracy.
void StripOnlineSoftmaxBf16(const float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t open0,
                            float* row_max, float* row_sum, float* acc, int64_t acc_cols, int64_t ld_acc,
                            uint16_t* probs16, int64_t ld16);

// acc [rows, Dh] f32 (row stride ld_acc) += P [rows, cols] . V, P bf16 (row stride ld_probs; its pairs read
// whole, StripOnlineSoftmaxBf16), V being values [k0, k0 + cols) of `pairs` (PackValuePairs; of an odd last pair,
// the first key's lanes alone). 1 <= rows <= kFlashStripRows; k0 even.
void StripAddContextBf16(const uint16_t* probs, int64_t ld_probs, int64_t rows, const uint16_t* pairs, int64_t k0,
                         int64_t cols, int64_t head_dim, float* acc, int64_t ld_acc);

}  // namespace attnserve
