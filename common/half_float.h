// IEEE binary16 (F16) and bfloat16 (BF16) to f32, exact (every value of both formats is an f32 value).
#pragma once

#include <cstdint>

namespace attnserve {

float HalfToFloat(uint16_t bits);
float BFloat16ToFloat(uint16_t bits);
// Round-to-nearest-even conversions, for tests and for writing files.
uint16_t FloatToHalf(float value);
uint16_t FloatToBFloat16(float value);

}  // namespace attnserve
