// FlashAttention's f32 block matmuls on AVX-512, as register-blocked kernels that pack nothing per call.
//
// sgemm packs both operands on every call; with a head's 64-dim rows that packing, and a scores block too large
// for the L1 cache, kept the f32 flash path at 62-70 % of sgemm's rate. Here a head's keys are packed once per
// (sequence, head) as panels of 16 keys, and the query rows are taken in strips of kFlashStripRows: a strip's
// scores against a chunk of keys ([6, 512] floats: 12 KiB) stay in the L1 cache from the matmul through the
// online softmax to the context matmul, with the chunk's keys and values in the L2 cache for every strip.
//
// Every function runs on the calling thread and is safe to call from many threads on different outputs. Call
// them only where FlashStripsAvailable(head_dim).
#pragma once

#include <cstdint>

namespace attnserve {

constexpr int64_t kFlashStripRows = 6;
constexpr int64_t kFlashStripMaxHeadDim = 128;
constexpr int64_t kKeyPanelKeys = 16;  // keys per packed panel: one AVX-512 register of scores

// Whether the CPU has AVX-512 F, ATTNSERVE_MAX_KERNEL_ISA allows it, and 1 <= head_dim <= kFlashStripMaxHeadDim.
bool FlashStripsAvailable(int64_t head_dim);

// Floats PackKeyPanels writes for `keys` keys: keys rounded up to kKeyPanelKeys, times head_dim.
int64_t PackedKeyFloats(int64_t keys, int64_t head_dim);

// Keys [keys, Dh] (row stride ld) as panels of kKeyPanelKeys keys, each [Dh][16]: key j's element d at
// panels[(j / 16) * 16 * Dh + d * 16 + j % 16]. The last panel's missing keys are zeros.
void PackKeyPanels(const float* keys, int64_t num_keys, int64_t ld, int64_t head_dim, float* panels);

// scores [rows, cols] (row stride ld_scores) = Q [rows, Dh] (row stride ld_q) . K^T, K being keys
// [k0, k0 + cols) of `panels` (PackKeyPanels). 1 <= rows <= kFlashStripRows; k0 a multiple of kKeyPanelKeys.
// Writes exactly rows x cols floats.
void StripScores(const float* q, int64_t ld_q, int64_t rows, const float* panels, int64_t k0, int64_t cols,
                 int64_t head_dim, float* scores, int64_t ld_scores);

// OnlineSoftmaxBlock (core/row_softmax.h), same contract and results within float rounding, written with AVX-512
// intrinsics: masked loads and stores at the row tails, the exponentials by vscalefps (core/exp_avx512.h). Any
// number of rows.
void StripOnlineSoftmax(float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t open0, float* row_max,
                        float* row_sum, float* acc, int64_t acc_cols, int64_t ld_acc);

// acc [rows, Dh] (row stride ld_acc) += P [rows, cols] (row stride ld_probs) . V [cols, Dh] (dense rows, stride
// Dh). 1 <= rows <= kFlashStripRows.
void StripAddContext(const float* probs, int64_t ld_probs, int64_t rows, const float* values, int64_t cols,
                     int64_t head_dim, float* acc, int64_t ld_acc);

}  // namespace attnserve
