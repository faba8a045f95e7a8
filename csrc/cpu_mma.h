// 16-bit float storage and the warp-wide tensor-core instructions the kernels use, emulated on the CPU on top of
// cpu_shim.h: mma.sync.m16n8k16 (bf16 or fp16 in, fp32 accumulate) and ldmatrix.m8n8 (.x1/.x2/.x4, optional
// .trans). They let the tensor-core code of attention_tile.cuh and attention_flash.cuh (fragment loads, packing of
// P, register layouts, shared-memory swizzles) run and be checked without a GPU.
//
// Written from the PTX ISA's fragment figures; lane = 4*g + t, the lower-indexed element of a pair in the low 16 bits.
// mma.m16n8k16:
//   A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16x8, col):  b0 = B[2t..2t+1][g],  b1 = B[2t+8..2t+9][g]
//   C (16x8, f32):  c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// ldmatrix.m8n8.xN: lane 8*m + r supplies the address of row r (8 contiguous 16-bit elements, 16-byte aligned) of
// matrix m < N; register m of lane 4*g + t receives M_m[g][2t..2t+1], or with .trans M_m[2t][g] and M_m[2t+1][g].
#pragma once

#include <type_traits>

#include "cpu_shim.h"

namespace pf_shim {

struct bfloat16 {
  uint16_t bits;
};

struct float16 {
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

// IEEE binary16 through the compiler's _Float16 (GCC >= 12 on x86-64): rounding to nearest even, like
// __float2half_rn.
inline float fp16_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof h);
  return static_cast<float>(h);
}

inline uint16_t float_to_fp16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}

template <class T>
inline float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, bfloat16>)
    return bf16_to_float(bits);
  else
    return fp16_to_float(bits);
}

template <class T>
inline void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& warp = my_warp();
  const int lane = linear_thread() % kWarpSize;
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  std::memcpy(warp.fragments[lane], mine, sizeof mine);
  warp.barrier.arrive_and_wait();
  float A[16][16], B[16][8];
  auto lo = [](uint32_t r) { return to_float<T>(static_cast<uint16_t>(r & 0xffffu)); };
  auto hi = [](uint32_t r) { return to_float<T>(static_cast<uint16_t>(r >> 16)); };
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

inline void mma_m16n8k16_bf16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_m16n8k16<bfloat16>(acc, a, b0, b1);
}

// Shared-memory bank conflicts of the emulated ldmatrix calls: one matrix (8 rows of 16 bytes) is one 128-byte
// access of 32 4-byte banks, so it is conflict-free when its 8 distinct row addresses fall into 8 distinct 16-byte
// bank groups ((address / 16) % 8). Each matrix adds (largest number of distinct rows sharing a group) - 1.
inline std::atomic<long> ldmatrix_matrices{0};
inline std::atomic<long> ldmatrix_conflicts{0};

template <int N, bool TRANS>
inline void ldmatrix(uint32_t (&r)[N], const void* row_address) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  Warp& warp = my_warp();
  const int lane = linear_thread() % kWarpSize;
  // Only the first 8*N lanes' addresses are used; the others may hold anything.
  if (lane < 8 * N) {
    if (reinterpret_cast<std::uintptr_t>(row_address) % 16 != 0) fault("ldmatrix row address not 16-byte aligned");
    check_shared_read(row_address, 16, "ldmatrix");
  }
  warp.rows[lane] = static_cast<const unsigned char*>(row_address);
  warp.barrier.arrive_and_wait();
  if (lane == 0) {
    long conflicts = 0;
    for (int m = 0; m < N; ++m) {
      int per_group[8] = {};
      for (int row = 0; row < 8; ++row) {
        const unsigned char* p = warp.rows[8 * m + row];
        bool repeated = false;  // the same address twice is a broadcast, not a conflict
        for (int other = 0; other < row; ++other) repeated = repeated || warp.rows[8 * m + other] == p;
        if (!repeated) ++per_group[(reinterpret_cast<std::uintptr_t>(p) / 16) % 8];
      }
      int worst = 0;
      for (int c : per_group) worst = c > worst ? c : worst;
      conflicts += worst - 1;
    }
    ldmatrix_matrices += N;
    ldmatrix_conflicts += conflicts;
  }
  const int g = lane / 4, t = lane % 4;
  auto element = [&](int m, int row, int col) {
    uint16_t v;
    std::memcpy(&v, warp.rows[8 * m + row] + 2 * col, sizeof v);
    return static_cast<uint32_t>(v);
  };
  for (int m = 0; m < N; ++m)
    r[m] = TRANS ? element(m, 2 * t, g) | (element(m, 2 * t + 1, g) << 16)
                 : element(m, g, 2 * t) | (element(m, g, 2 * t + 1) << 16);
  warp.barrier.arrive_and_wait();  // the row slots may be overwritten by the next call from here on
}

}  // namespace pf_shim
