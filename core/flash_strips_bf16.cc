#include "core/flash_strips_bf16.h"

#include <algorithm>
#include <cassert>
#include <cstring>

#include "core/avx512_target.h"
#include "core/bf16_rows.h"
#include "core/exp_avx512.h"
#include "core/flash_strips_avx512.h"
#include "core/kernel_variants.h"
#include "core/strip_tiles.h"

#define ATTN_STRIP_SOFTMAX_INLINE ATTN_AVX512_BF16_INLINE
#include "core/strip_softmax_inl.h"

namespace attnserve {
namespace {

// The bf16 pair at `at` (two elements) in every lane.
ATTN_AVX512_BF16_INLINE __m512bh PairOf(const uint16_t* at) {
  uint32_t bits;
  std::memcpy(&bits, at, sizeof(bits));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(bits)));
}

// The bf16 at `at` and a zero in every lane: an odd head's last dimension (the element after it is another
// head's, or past the buffer's end; the panels hold a zero there).
ATTN_AVX512_BF16_INLINE __m512bh SingleOf(const uint16_t* at) {
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(*at));
}

// acc [R, 16 * kVectors] += Q's pair (or, kSingle, last element) of R rows . the pair's registers of kVectors
// key panels (keys_at: the first panel's pair, panels `panel_elems` apart).
template <int R, int kVectors, bool kSingle>
ATTN_AVX512_BF16_INLINE void ScoresPairStep(const uint16_t* q, int64_t ld_q, const uint16_t* keys_at,
                                            int64_t panel_elems, __m512 (&acc)[R][kVectors]) {
  __m512bh keys[kVectors];
#pragma GCC unroll 4
  for (int t = 0; t < kVectors; ++t)
    keys[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(keys_at + t * panel_elems));
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512bh qp = kSingle ? SingleOf(q + r * ld_q) : PairOf(q + r * ld_q);
#pragma GCC unroll 4
    for (int t = 0; t < kVectors; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], qp, keys[t]);
  }
}

// scores [R, 16 * kVectors] (the last register masked to `last`) = Q [R, Dh] . the kVectors panels from `panel`:
// per pair of head dimensions, kVectors panel loads and R broadcasts for R x kVectors vdpbf16ps.
template <int R, int kVectors>
ATTN_AVX512_BF16 void ScoresTileBf16(const uint16_t* q, int64_t ld_q, const uint16_t* panel, int64_t dh, float* scores,
                                     int64_t ld_scores, __mmask16 last) {
  __m512 acc[R][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < kVectors; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const int64_t panel_elems = kKeyPanelKeys * RoundUp(dh, 2), pairs = dh / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    ScoresPairStep<R, kVectors, false>(q + 2 * p, ld_q, panel + p * 2 * kKeyPanelKeys, panel_elems, acc);
  }
  if (dh % 2 != 0) {
    ScoresPairStep<R, kVectors, true>(q + 2 * pairs, ld_q, panel + pairs * 2 * kKeyPanelKeys, panel_elems, acc);
  }
  StoreTile(acc, last, scores, ld_scores);
}

// sum [R][kVectors] += a pair of P's columns of R rows . a key pair's kVectors value registers; kSingle: the pair's
// first key alone (its partner's lanes not loaded: a key some rows may not see, whose value could be inf).
template <int R, int kVectors, bool kSingle>
ATTN_AVX512_BF16_INLINE void ContextPairStep(const uint16_t* probs, int64_t ld_probs, const uint16_t* pair,
                                             __m512 (&sum)[R][kVectors]) {
  __m512bh v[kVectors];
#pragma GCC unroll 8
  for (int i = 0; i < kVectors; ++i) {
    v[i] = reinterpret_cast<__m512bh>(kSingle ? _mm512_maskz_loadu_epi16(0x55555555u, pair + 32 * i)
                                              : _mm512_loadu_si512(pair + 32 * i));
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512bh pp = PairOf(probs + r * ld_probs);
#pragma GCC unroll 8
    for (int i = 0; i < kVectors; ++i) sum[r][i] = _mm512_dpbf16_ps(sum[r][i], pp, v[i]);
  }
}

// acc [R, Dh] += P [R, cols] . V (keys [0, cols) of `pairs`, each key pair [Dh16][2]), Dh16 = 16 * kVectors, the
// last register masked to `last` in acc: the accumulators stay in registers over all the keys. Per key pair:
// kVectors value loads and R broadcasts of a pair of P.
template <int R, int kVectors>
ATTN_AVX512_BF16 void ContextTileBf16(const uint16_t* probs, int64_t ld_probs, const uint16_t* pairs, int64_t cols,
                                      float* acc, int64_t ld_acc, __mmask16 last) {
  __m512 sum[R][kVectors];
  LoadTile(acc, ld_acc, last, sum);
  const int64_t full_pairs = cols / 2;
  for (int64_t p = 0; p < full_pairs; ++p) {
    ContextPairStep<R, kVectors, false>(probs + 2 * p, ld_probs, pairs + p * 32 * kVectors, sum);
  }
  if (cols % 2 != 0) {
    ContextPairStep<R, kVectors, true>(probs + 2 * full_pairs, ld_probs, pairs + full_pairs * 32 * kVectors, sum);
  }
  StoreTile(sum, last, acc, ld_acc);
}

// A strip's context in tiles of ContextTileRows(kVectors) rows.
template <int kVectors>
void StripContextBf16(const uint16_t* probs, int64_t ld_probs, int64_t rows, const uint16_t* pairs, int64_t cols,
                      int64_t dh, float* acc, int64_t ld_acc) {
  constexpr int kRows = ContextTileRows(kVectors);
  const __mmask16 last = FirstLanes(dh - 16 * (kVectors - 1));
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    WithCount<kRows>(std::min<int64_t>(kRows, rows - r0), [&](auto tile_rows) {
      ContextTileBf16<decltype(tile_rows)::value, kVectors>(probs + r0 * ld_probs, ld_probs, pairs, cols,
                                                            acc + r0 * ld_acc, ld_acc, last);
    });
  }
}

using StripContextBf16Fn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*,
                                    int64_t);

constexpr StripContextBf16Fn kStripContexts[kFlashStripMaxHeadDim / 16] = {
    StripContextBf16<1>, StripContextBf16<2>, StripContextBf16<3>, StripContextBf16<4>,
    StripContextBf16<5>, StripContextBf16<6>, StripContextBf16<7>, StripContextBf16<8>};

// The probabilities rounded to bf16 (to nearest even) into the rows of probs16, their exponentials as accurate
// as that needs.
struct ToBf16 {
  uint16_t* probs16;
  int64_t ld16;
  struct Store {
    uint16_t* row;
    ATTN_AVX512_INLINE static __m512 Exp(__m512 x) { return ExpNonPositiveForBf16Avx512(x); }
    ATTN_AVX512_BF16_INLINE void operator()(int64_t j, __m512 e, __mmask16 lanes) const {
      _mm256_mask_storeu_epi16(row + j, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
    }
  };
  Store Row(int64_t r) const { return {probs16 + r * ld16}; }
};

ATTN_AVX512_BF16 void StripOnlineSoftmaxToBf16(const float* scores, int64_t rows, int64_t cols, int64_t ld,
                                               int64_t open0, float* row_max, float* row_sum, float* acc,
                                               int64_t acc_cols, int64_t ld_acc, uint16_t* probs16, int64_t ld16) {
  strip_softmax::Step(scores, rows, cols, RoundUp(cols, 2), ld, open0, row_max, row_sum, acc, acc_cols, ld_acc,
                      ToBf16{probs16, ld16});
}

}  // namespace

bool FlashBf16StripsAvailable(int64_t head_dim) {
  static const bool bf16 = PickedKernelIsa() == KernelIsa::kAvx512 && CpuHasAvx512Bf16();
  return bf16 && head_dim >= 1 && head_dim <= kFlashStripMaxHeadDim;
}

int64_t PackedKeyPairElems(int64_t keys, int64_t head_dim) {
  return RoundUp(keys, kKeyPanelKeys) * RoundUp(head_dim, 2);
}

void PackKeyPairPanels(const uint16_t* keys, int64_t num_keys, int64_t ld, int64_t head_dim, uint16_t* panels) {
  const int64_t dh2 = RoundUp(head_dim, 2), pairs = head_dim / 2;
  std::fill_n(panels, PackedKeyPairElems(num_keys, head_dim), uint16_t{0});
  // Key by key, a pair per 4-byte store (the panel, 2 KiB at Dh = 64, stays in the L1 cache).
  for (int64_t j = 0; j < num_keys; ++j) {
    const uint16_t* row = keys + j * ld;
    uint16_t* dst = panels + (j / kKeyPanelKeys) * kKeyPanelKeys * dh2 + (j % kKeyPanelKeys) * 2;
    for (int64_t p = 0; p < pairs; ++p) std::memcpy(dst + p * 2 * kKeyPanelKeys, row + 2 * p, 2 * sizeof(uint16_t));
    if (head_dim % 2 != 0) dst[pairs * 2 * kKeyPanelKeys] = row[head_dim - 1];
  }
}

int64_t PackedValuePairElems(int64_t keys, int64_t head_dim) { return RoundUp(keys, 2) * RoundUp(head_dim, 16); }

void PackValuePairs(const uint16_t* values, int64_t num_keys, int64_t ld, int64_t head_dim, uint16_t* pairs) {
  const int64_t dh16 = RoundUp(head_dim, 16);
  std::fill_n(pairs, PackedValuePairElems(num_keys, head_dim), uint16_t{0});
  for (int64_t j = 0; j + 1 < num_keys; j += 2) {  // two rows interleaved
    const uint16_t *even = values + j * ld, *odd = even + ld;
    uint16_t* dst = pairs + j * dh16;
    for (int64_t d = 0; d < head_dim; ++d) {
      dst[2 * d] = even[d];
      dst[2 * d + 1] = odd[d];
    }
  }
  if (num_keys % 2 != 0) {
    const uint16_t* last = values + (num_keys - 1) * ld;
    for (int64_t d = 0; d < head_dim; ++d) pairs[(num_keys - 1) * dh16 + 2 * d] = last[d];
  }
}

void StripScoresBf16(const uint16_t* q, int64_t ld_q, int64_t rows, const uint16_t* panels, int64_t k0, int64_t cols,
                     int64_t head_dim, float* scores, int64_t ld_scores) {
  constexpr int64_t kTileKeys = 16 * kMaxKeyVectors;
  const int64_t dh2 = RoundUp(head_dim, 2);
  for (int64_t j = 0; j < cols; j += kTileKeys) {
    const int64_t width = std::min(kTileKeys, cols - j), vectors = (width + 15) / 16;
    const __mmask16 last = FirstLanes(width - 16 * (vectors - 1));
    const uint16_t* panel = panels + (k0 + j) * dh2;
    WithCount<kFlashStripRows>(rows, [&](auto r) {
      WithCount<kMaxKeyVectors>(vectors, [&](auto v) {
        ScoresTileBf16<decltype(r)::value, decltype(v)::value>(q, ld_q, panel, head_dim, scores + j, ld_scores, last);
      });
    });
  }
}

void StripOnlineSoftmaxBf16(const float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t open0,
                            float* row_max, float* row_sum, float* acc, int64_t acc_cols, int64_t ld_acc,
                            uint16_t* probs16, int64_t ld16) {
  assert(ld16 >= RoundUp(cols, 2));
  StripOnlineSoftmaxToBf16(scores, rows, cols, ld, open0, row_max, row_sum, acc, acc_cols, ld_acc, probs16, ld16);
}

void StripAddContextBf16(const uint16_t* probs, int64_t ld_probs, int64_t rows, const uint16_t* pairs, int64_t k0,
                         int64_t cols, int64_t head_dim, float* acc, int64_t ld_acc) {
  const int64_t dh16 = RoundUp(head_dim, 16);
  kStripContexts[dh16 / 16 - 1](probs, ld_probs, rows, pairs + k0 * dh16, cols, head_dim, acc, ld_acc);
}

}  // namespace attnserve
