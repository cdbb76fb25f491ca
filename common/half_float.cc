#include "common/half_float.h"

#include <cstring>

// Bit manipulation rather than float arithmetic, so the results do not depend on the FPU rounding mode,
// flush-to-zero settings or compiler flags.

namespace attnserve {
namespace {

float BitsToFloat(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

uint32_t FloatToBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// `value >> shift` rounded to nearest, ties to even. 1 <= shift <= 31.
uint32_t ShiftRightRoundEven(uint32_t value, int shift) {
  const uint32_t result = value >> shift;
  const uint32_t remainder = value & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (remainder > half || (remainder == half && (result & 1u) != 0)) return result + 1;
  return result;
}

}  // namespace

float HalfToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0x1F) {  // inf / NaN: keep the payload so NaNs stay NaN
    return BitsToFloat(sign | 0x7F800000u | (mantissa << 13));
  }
  if (exponent != 0) {  // normal: rebias 15 -> 127
    return BitsToFloat(sign | ((exponent + 112) << 23) | (mantissa << 13));
  }
  if (mantissa == 0) return BitsToFloat(sign);  // +-0
  // Subnormal mantissa * 2^-24: normalise so the leading 1 moves to bit 10 (it is a normal f32).
  int32_t f32_exponent = 113;  // 2^-14 biased by 127, before the shifts below
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --f32_exponent;
  }
  return BitsToFloat(sign | (static_cast<uint32_t>(f32_exponent) << 23) | ((mantissa & 0x3FFu) << 13));
}

float BFloat16ToFloat(uint16_t bits) { return BitsToFloat(static_cast<uint32_t>(bits) << 16); }

uint16_t FloatToHalf(float value) {
  const uint32_t bits = FloatToBits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) {  // NaN: force the quiet bit so a payload that lives only in low bits survives
    return static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  }
  // 65520 is halfway between 65504 (max half, odd mantissa) and 2^16, so it and everything above rounds to inf.
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (abs >= 0x38800000u) {  // >= 2^-14: normal half. Rebias 127 -> 15; a mantissa carry bumps the exponent.
    return static_cast<uint16_t>(sign | ShiftRightRoundEven(abs - 0x38000000u, 13));
  }
  // 2^-25 is halfway between 0 and the smallest subnormal 2^-24; ties go to the even 0.
  if (abs <= 0x33000000u) return sign;
  // Subnormal half: round(value * 2^24). value = m * 2^(e - 150) with the implicit bit, so shift by 126 - e.
  const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
  const int shift = 126 - static_cast<int>(abs >> 23);  // in [14, 24]
  return static_cast<uint16_t>(sign | ShiftRightRoundEven(mantissa, shift));
}

uint16_t FloatToBFloat16(float value) {
  const uint32_t bits = FloatToBits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN: truncating a low-bit payload would give inf
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  // Large finite values correctly round up to inf here.
  return static_cast<uint16_t>(ShiftRightRoundEven(bits, 16));
}

}  // namespace attnserve
