// bfloat16 storage and the warp-wide tensor-core instruction mma.sync.m16n8k16 (bf16 in, fp32 accumulate),
// emulated on the CPU on top of cpu_shim.h. It lets the tensor-core tile code of attention_tile.cuh (fragment
// loads, packing of P, register layouts) run and be checked without a GPU.
//
// The emulation is written from the PTX ISA's fragment figures for m16n8k16 (.bf16): lane = 4*g + t;
//   A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16x8, col):  b0 = B[2t..2t+1][g],  b1 = B[2t+8..2t+9][g]
//   C (16x8, f32):  c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// with the lower-indexed element of each pair in the low 16 bits.
#pragma once

#include "cpu_shim.h"

namespace pf_shim {

struct bfloat16 {
  uint16_t bits;
};

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, like __float2bfloat16_rn
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline void mma_m16n8k16_bf16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& warp = my_warp();
  const int lane = linear_thread() % kWarpSize;
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  std::memcpy(warp.fragments[lane], mine, sizeof mine);
  warp.barrier.arrive_and_wait();
  float A[16][16], B[16][8];
  auto lo = [](uint32_t r) { return bf16_to_float(static_cast<uint16_t>(r & 0xffffu)); };
  auto hi = [](uint32_t r) { return bf16_to_float(static_cast<uint16_t>(r >> 16)); };
  for (int l = 0; l < kWarpSize; ++l) {
    const uint32_t* r = warp.fragments[l];
    const int g = l / 4, t = l % 4;
    A[g][2 * t] = lo(r[0]), A[g][2 * t + 1] = hi(r[0]);
    A[g + 8][2 * t] = lo(r[1]), A[g + 8][2 * t + 1] = hi(r[1]);
    A[g][2 * t + 8] = lo(r[2]), A[g][2 * t + 9] = hi(r[2]);
    A[g + 8][2 * t + 8] = lo(r[3]), A[g + 8][2 * t + 9] = hi(r[3]);
    B[2 * t][g] = lo(r[4]), B[2 * t + 1][g] = hi(r[4]);
    B[2 * t + 8][g] = lo(r[5]), B[2 * t + 9][g] = hi(r[5]);
  }
  warp.barrier.arrive_and_wait();  // fragments may be overwritten by the next call from here on
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    acc[e] += sum;
  }
}

}  // namespace pf_shim
