// attnserve's version, from project(attnserve VERSION ...) in the top-level CMakeLists.txt (passed by the
// attnserve::common target), so --version and the build cannot disagree.
#pragma once

#ifndef ATTNSERVE_VERSION
#error "ATTNSERVE_VERSION is not defined: link the target with attnserve::common"
#endif

namespace attnserve {

inline constexpr char kAttnserveVersion[] = ATTNSERVE_VERSION;

}  // namespace attnserve
