// backend/cpu/amx_tiles.hpp — the AMX tile configuration the CPU's AMX
// kernels share (gemm_amx.cpp, attention_amx.cpp). Include only from files
// built with -mamx-tile.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace pagedrt::cpu::amx {

// ldtilecfg's 64-byte operand, palette 1.
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0 .. count - 1 as 16 rows of 64 bytes, on the calling thread (the
// configuration is a thread's; _tile_release() gives it back).
inline void configure_tiles(int count) {
  TileConfig c;
  for (int t = 0; t < count; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  // GCC does not see ldtilecfg read c: without the barrier it dropped the
  // stores above (rows and widths of 0: a fault at the first tile load)
  __asm__ __volatile__("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

}  // namespace pagedrt::cpu::amx
