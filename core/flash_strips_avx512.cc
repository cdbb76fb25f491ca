#include "core/flash_strips_avx512.h"

#include <algorithm>
#include <cassert>

#include "core/avx512_target.h"
#include "core/exp_avx512.h"
#include "core/kernel_variants.h"
#include "core/strip_tiles.h"

#define ATTN_STRIP_SOFTMAX_INLINE ATTN_AVX512_INLINE
#include "core/strip_softmax_inl.h"

namespace attnserve {
namespace {

// scores [R, 16 * kVectors] (the last register masked to `last`) = Q [R, Dh] . the kVectors panels from `panel`.
// Per head dimension: kVectors panel loads and R broadcasts of Q for R x kVectors FMAs.
template <int R, int kVectors>
ATTN_AVX512 void ScoresTile(const float* q, int64_t ld_q, const float* panel, int64_t dh, float* scores,
                            int64_t ld_scores, __mmask16 last) {
  __m512 acc[R][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < kVectors; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const int64_t panel_floats = kKeyPanelKeys * dh;
  for (int64_t d = 0; d < dh; ++d) {
    __m512 keys[kVectors];
#pragma GCC unroll 4
    for (int t = 0; t < kVectors; ++t) keys[t] = _mm512_loadu_ps(panel + t * panel_floats + d * kKeyPanelKeys);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 qd = _mm512_set1_ps(q[r * ld_q + d]);
#pragma GCC unroll 4
      for (int t = 0; t < kVectors; ++t) acc[r][t] = _mm512_fmadd_ps(qd, keys[t], acc[r][t]);
    }
  }
  StoreTile(acc, last, scores, ld_scores);
}

using ScoresTileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, __mmask16);

template <int R>
constexpr ScoresTileFn kScoresByWidth[kMaxKeyVectors] = {ScoresTile<R, 1>, ScoresTile<R, 2>, ScoresTile<R, 3>,
                                                         ScoresTile<R, 4>};
constexpr const ScoresTileFn* kScoresTiles[kFlashStripRows] = {kScoresByWidth<1>, kScoresByWidth<2>, kScoresByWidth<3>,
                                                               kScoresByWidth<4>, kScoresByWidth<5>, kScoresByWidth<6>};

// acc [R, Dh] += P [R, cols] . V [cols, Dh], Dh = 16 * kVectors with the last register masked to `last`: the
// accumulators stay in registers over all `cols` keys. Per key: kVectors value loads and R broadcasts of P.
template <int R, int kVectors>
ATTN_AVX512 void ContextTile(const float* probs, int64_t ld_probs, const float* values, int64_t cols, int64_t dh,
                             float* acc, int64_t ld_acc, __mmask16 last) {
  __m512 sum[R][kVectors];
  LoadTile(acc, ld_acc, last, sum);
  for (int64_t j = 0; j < cols; ++j) {
    const float* row = values + j * dh;
    __m512 v[kVectors];
#pragma GCC unroll 8
    for (int i = 0; i < kVectors; ++i) {
      v[i] = _mm512_maskz_loadu_ps(TileMask<kVectors>(i, last), row + 16 * i);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(probs[r * ld_probs + j]);
#pragma GCC unroll 8
      for (int i = 0; i < kVectors; ++i) sum[r][i] = _mm512_fmadd_ps(p, v[i], sum[r][i]);
    }
  }
  StoreTile(sum, last, acc, ld_acc);
}

// A strip's context in tiles of ContextTileRows(kVectors) rows.
template <int kVectors>
ATTN_AVX512 void StripContext(const float* probs, int64_t ld_probs, int64_t rows, const float* values, int64_t cols,
                              int64_t dh, float* acc, int64_t ld_acc) {
  constexpr int kRows = ContextTileRows(kVectors);
  const __mmask16 last = FirstLanes(dh - 16 * (kVectors - 1));
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    WithCount<kRows>(std::min<int64_t>(kRows, rows - r0), [&](auto tile_rows) {
      ContextTile<decltype(tile_rows)::value, kVectors>(probs + r0 * ld_probs, ld_probs, values, cols, dh,
                                                        acc + r0 * ld_acc, ld_acc, last);
    });
  }
}

using StripContextFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);

constexpr StripContextFn kStripContexts[kFlashStripMaxHeadDim / 16] = {
    StripContext<1>, StripContext<2>, StripContext<3>, StripContext<4>,
    StripContext<5>, StripContext<6>, StripContext<7>, StripContext<8>};

// 64-bit lanes of two registers of floats, interleaved: _mm512_unpack{lo,hi}_pd on floats.
ATTN_AVX512_INLINE __m512 UnpackLo64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
ATTN_AVX512_INLINE __m512 UnpackHi64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

// rows[i][j] -> rows[j][i] for a 16 x 16 block of floats: pairs of floats, then pairs of pairs, within each
// 128-bit lane; then the lanes, in two rounds of vshuff32x4.
ATTN_AVX512_INLINE void Transpose16x16(__m512 (&rows)[16]) {
  __m512 pairs[16], quads[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    pairs[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);      // per lane: columns 0, 1 of rows i, i + 1
    pairs[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);  // columns 2, 3
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {  // quads[i + c]: per lane, column c of rows i .. i + 3
    quads[i] = UnpackLo64(pairs[i], pairs[i + 2]);
    quads[i + 1] = UnpackHi64(pairs[i], pairs[i + 2]);
    quads[i + 2] = UnpackLo64(pairs[i + 1], pairs[i + 3]);
    quads[i + 3] = UnpackHi64(pairs[i + 1], pairs[i + 3]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {  // lane l of quads[4g + c] holds column 4l + c of rows 4g .. 4g + 3
    const __m512 even01 = _mm512_shuffle_f32x4(quads[c], quads[4 + c], 0x88);  // lanes 0, 2 of groups 0, 1
    const __m512 odd01 = _mm512_shuffle_f32x4(quads[c], quads[4 + c], 0xDD);   // lanes 1, 3
    const __m512 even23 = _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(quads[8 + c], quads[12 + c], 0xDD);
    rows[c] = _mm512_shuffle_f32x4(even01, even23, 0x88);
    rows[8 + c] = _mm512_shuffle_f32x4(even01, even23, 0xDD);
    rows[4 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
    rows[12 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0xDD);
  }
}

// PackKeyPanels by 16 x 16 blocks transposed in registers: each panel's keys read a row of 16 dimensions at a
// time (masked at the head's end), missing keys as zero rows.
ATTN_AVX512 void PackKeyPanelsAvx512(const float* keys, int64_t num_keys, int64_t ld, int64_t dh, float* panels) {
  for (int64_t j0 = 0; j0 < num_keys; j0 += kKeyPanelKeys) {
    const int64_t present = std::min<int64_t>(kKeyPanelKeys, num_keys - j0);
    float* panel = panels + j0 * dh;
    for (int64_t d0 = 0; d0 < dh; d0 += 16) {
      const int64_t dims = std::min<int64_t>(16, dh - d0);
      __m512 block[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        block[i] =
            i < present ? _mm512_maskz_loadu_ps(FirstLanes(dims), keys + (j0 + i) * ld + d0) : _mm512_setzero_ps();
      }
      Transpose16x16(block);
      for (int64_t d = 0; d < dims; ++d) _mm512_storeu_ps(panel + (d0 + d) * kKeyPanelKeys, block[d]);
    }
  }
}

// The probabilities back over the scores.
struct OverScores {
  float* scores;
  int64_t ld;
  struct Store {
    float* row;
    ATTN_AVX512_INLINE static __m512 Exp(__m512 x) { return ExpNonPositiveAvx512(x); }
    ATTN_AVX512_INLINE void operator()(int64_t j, __m512 e, __mmask16 lanes) const {
      _mm512_mask_storeu_ps(row + j, lanes, e);
    }
  };
  Store Row(int64_t r) const { return {scores + r * ld}; }
};

ATTN_AVX512 void StripOnlineSoftmaxAvx512(float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t open0,
                                          float* row_max, float* row_sum, float* acc, int64_t acc_cols,
                                          int64_t ld_acc) {
  strip_softmax::Step(scores, rows, cols, cols, ld, open0, row_max, row_sum, acc, acc_cols, ld_acc,
                      OverScores{scores, ld});
}

}  // namespace

void StripOnlineSoftmax(float* scores, int64_t rows, int64_t cols, int64_t ld, int64_t open0, float* row_max,
                        float* row_sum, float* acc, int64_t acc_cols, int64_t ld_acc) {
  StripOnlineSoftmaxAvx512(scores, rows, cols, ld, open0, row_max, row_sum, acc, acc_cols, ld_acc);
}

bool FlashStripsAvailable(int64_t head_dim) {
  static const bool avx512 = PickedKernelIsa() == KernelIsa::kAvx512;
  return avx512 && head_dim >= 1 && head_dim <= kFlashStripMaxHeadDim;
}

int64_t PackedKeyFloats(int64_t keys, int64_t head_dim) {
  return (keys + kKeyPanelKeys - 1) / kKeyPanelKeys * kKeyPanelKeys * head_dim;
}

void PackKeyPanels(const float* keys, int64_t num_keys, int64_t ld, int64_t head_dim, float* panels) {
  PackKeyPanelsAvx512(keys, num_keys, ld, head_dim, panels);
}

void StripScores(const float* q, int64_t ld_q, int64_t rows, const float* panels, int64_t k0, int64_t cols,
                 int64_t head_dim, float* scores, int64_t ld_scores) {
  const ScoresTileFn* by_width = kScoresTiles[rows - 1];
  constexpr int64_t kTileKeys = 16 * kMaxKeyVectors;
  for (int64_t j = 0; j < cols; j += kTileKeys) {
    const int64_t width = std::min(kTileKeys, cols - j), vectors = (width + 15) / 16;
    by_width[vectors - 1](q, ld_q, panels + (k0 + j) * head_dim, head_dim, scores + j, ld_scores,
                          FirstLanes(width - 16 * (vectors - 1)));
  }
}

void StripAddContext(const float* probs, int64_t ld_probs, int64_t rows, const float* values, int64_t cols,
                     int64_t head_dim, float* acc, int64_t ld_acc) {
  kStripContexts[(head_dim + 15) / 16 - 1](probs, ld_probs, rows, values, cols, head_dim, acc, ld_acc);
}

}  // namespace attnserve
