// backend/cpu/simd.hpp — <immintrin.h> without GCC 12's false warnings.
//
// GCC 12's avx512fintrin.h makes its "undefined" vectors (_mm512_undefined_ps()
// and friends, the pass-through operand of unmasked intrinsics) as
// `__m512 __Y = __Y;`. Inlined into our kernels, -Wall then reports each one:
// "'__Y' is used uninitialized" (89 warnings in one build; GCC bug 105593,
// fixed in GCC 13). The intrinsics are correct. The two warnings are turned off
// for the header's own lines only, so they still apply to our code. Include
// this instead of <immintrin.h>, before any header that might include it.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
