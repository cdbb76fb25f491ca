// What the strip kernels (core/flash_strips_avx512.cc, core/flash_strips_bf16.cc) share: register masks, the
// rows of a context tile, and the dispatch from a run-time row or register count to a tile compiled for it.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <type_traits>

#include "core/avx512_target.h"

namespace attnserve {

constexpr int kMaxKeyVectors = 4;  // a scores tile is at most 64 keys wide: 6 x 4 accumulators

constexpr int64_t RoundUp(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Lanes [0, n) of a register, 1 <= n <= 16.
inline __mmask16 FirstLanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// Rows per context tile for a head of `vectors` registers: rows x vectors accumulators, a value register per
// vector and a broadcast within the 32 registers, at most 6 rows (a strip).
constexpr int ContextTileRows(int vectors) { return std::min(6, (32 - 1 - vectors) / vectors); }
static_assert(ContextTileRows(4) == 6 && ContextTileRows(8) == 2, "registers of a context tile");

// Masks of a tile's registers: all lanes but in the last, `last`.
template <int kVectors>
ATTN_AVX512_INLINE __mmask16 TileMask(int i, __mmask16 last) {
  return i + 1 < kVectors ? __mmask16{0xFFFF} : last;
}

// tile [R][kVectors] = rows [R, 16 * kVectors] (row stride ld), the last register's lanes past `last` zero.
template <int R, int kVectors>
ATTN_AVX512_INLINE void LoadTile(const float* rows, int64_t ld, __mmask16 last, __m512 (&tile)[R][kVectors]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < kVectors; ++i)
      tile[r][i] = _mm512_maskz_loadu_ps(TileMask<kVectors>(i, last), rows + r * ld + 16 * i);
  }
}

// rows [R, 16 * kVectors] (row stride ld) = tile, the last register's lanes past `last` left alone.
template <int R, int kVectors>
ATTN_AVX512_INLINE void StoreTile(const __m512 (&tile)[R][kVectors], __mmask16 last, float* rows, int64_t ld) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < kVectors; ++i)
      _mm512_mask_storeu_ps(rows + r * ld + 16 * i, TileMask<kVectors>(i, last), tile[r][i]);
  }
}

// tile(std::integral_constant<int, n>{}), 1 <= n <= kMax <= 6: a tile's rows or registers as a template argument.
template <int kMax, typename Tile>
void WithCount(int64_t n, Tile&& tile) {
  static_assert(kMax >= 1 && kMax <= 6, "tiles of 1 to 6 rows or registers");
  assert(n >= 1 && n <= kMax);
  switch (n) {
    case 1:
      return tile(std::integral_constant<int, 1>{});
    case 2:
      if constexpr (kMax >= 2) return tile(std::integral_constant<int, 2>{});
      break;
    case 3:
      if constexpr (kMax >= 3) return tile(std::integral_constant<int, 3>{});
      break;
    case 4:
      if constexpr (kMax >= 4) return tile(std::integral_constant<int, 4>{});
      break;
    case 5:
      if constexpr (kMax >= 5) return tile(std::integral_constant<int, 5>{});
      break;
    case 6:
      if constexpr (kMax >= 6) return tile(std::integral_constant<int, 6>{});
      break;
  }
}

}  // namespace attnserve
