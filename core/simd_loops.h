// Included by the files whose loops carry `#pragma omp simd`. Clang under the sanitizers (the fuzz build)
// cannot vectorize those loops and says so as a warning, which -Werror makes fatal; there the scalar loops are
// what the sanitizers check anyway. (A diagnostic pragma outside push/pop holds to the end of the file.)
#pragma once

#if defined(__clang__)
#pragma clang diagnostic ignored "-Wpass-failed"
#endif
