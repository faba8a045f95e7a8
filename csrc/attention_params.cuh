// The arguments of the attention kernels and the launch geometry shared by the GPU launcher and the CPU tests.
//
// Grouped heads are packed into the query-tile rows: the block for key/value head `hk` computes the rows
// r = query * group + (q head - hk * group), so one K/V tile load serves every q head of its group. For decoding
// (Nq = 1) this turns a 1-row tile into a `group`-row one; for long Nq it changes nothing but the row order.
#pragma once

#include "platform.cuh"

namespace pf {

struct AttentionParams {
  const void* q;  // [B, Nq, Hq, Dqk], last dim contiguous
  const void* k;  // [B, Nk, Hkv, Dqk]
  const void* v;  // [B, Nk, Hkv, Dv]
  void* out;      // [B, Nq, Hq, Dv]
  float* lse;     // [B, Hq, Nq], contiguous, natural log
  // Split-KV workspace (num_splits > 1): per split, the normalised partial output and its lse in log2 units.
  float* part_out;        // [splits, B, Hq, Nq, Dv], contiguous
  float* part_lse;        // [splits, B, Hq, Nq], contiguous
  const int* kv_start;    // [B] or null (0)
  const int* kv_len;      // [B] or null (Nk)
  int64_t q_sb, q_sn, q_sh;  // strides in elements
  int64_t k_sb, k_sn, k_sh;
  int64_t v_sb, v_sn, v_sh;
  int64_t o_sb, o_sn, o_sh;
  int batch, nq, nk, hq, hkv, dqk, dv;
  int group;         // hq / hkv
  float scale_log2;  // scale * log2(e): the kernels work in base 2
  int causal;
  int num_splits;
  int vec_ok;  // every row start is 16-byte aligned: tiles may be copied 16 bytes at a time
};

constexpr int kBlockM = 64;  // packed query rows per block (16 per warp)
constexpr int kBlockN = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxHeadDim = 128;
constexpr int kMaxGridY = 65535;  // gridDim.y (batch x kv heads) and gridDim.z (splits) limit

// The head-dim tile both q·k and p·v use: the smallest of 32, 64, 128 that holds both head dims (0: unsupported).
__host__ __device__ constexpr int head_dim_tile(int dqk, int dv) {
  const int widest = imax(dqk, dv);
  return widest <= 32 ? 32 : widest <= 64 ? 64 : widest <= 128 ? 128 : 0;
}

// Shared memory of the forward kernel: Q, K and V tiles (rows padded by 16 bytes so that the fragment loads of the
// 8 row groups of a warp fall into different banks), plus the SIMT path's probability tile.
template <class T>
__host__ __device__ constexpr int smem_row(int d_tile) {
  return d_tile + 16 / static_cast<int>(sizeof(T));
}

template <class T>
__host__ __device__ constexpr std::size_t forward_smem_bytes(int d_tile, bool simt) {
  return sizeof(T) * static_cast<std::size_t>(kBlockM + 2 * kBlockN) * smem_row<T>(d_tile) +
         (simt ? sizeof(float) * kBlockM * (kBlockN + 4) : 0);
}

inline dim3 forward_grid(const AttentionParams& p) {
  return dim3(ceil_div(p.nq * p.group, kBlockM), p.batch * p.hkv, p.num_splits);
}

// The fast forward (attention_flash.cuh): 128 packed rows per block, one warp per 16 rows. Q stays in registers,
// and a warp's registers hold Q, O and S for its 16 rows (for head dim 128: 32 + 64 + 32 of them), so 32 rows per
// warp would pass 255; 8 warps x 16 rows is how the block reaches 128 rows, sharing every K/V tile between them.
constexpr int kFlashBlockM = 128;
constexpr int kFlashWarps = kFlashBlockM / 16;
constexpr int kFlashThreads = kFlashWarps * kWarpSize;

// Its head-dim tile for these parameters, or 0 when it does not take them: cp.async moves 16 bytes, so every row
// start must be 16-byte aligned (vec_ok); head dims up to 32 keep the 64-row tile of attention_fwd.cuh.
__host__ __device__ constexpr int flash_head_dim(int dqk, int dv, int vec_ok) {
  const int tile = head_dim_tile(dqk, dv);
  return vec_ok && (tile == 64 || tile == 128) ? tile : 0;
}

// Pipeline depth the launcher uses: K/V tiles of 8 KiB (d64) or 16 KiB (d128) each. Three stages at d64 (64 KiB
// with Q, two blocks per SM); two at d128 (96 KiB: one block per SM, which its registers allow anyway, and under
// the 99 KiB an sm_86/sm_89 block may have).
__host__ __device__ constexpr int flash_stages(int head_dim) { return head_dim <= 64 ? 3 : 2; }

// Q tile plus `stages` K and V tiles, unpadded (the swizzle keeps ldmatrix free of bank conflicts).
template <class T>
__host__ __device__ constexpr std::size_t flash_smem_bytes(int head_dim, int stages) {
  return sizeof(T) * static_cast<std::size_t>(kFlashBlockM + 2 * stages * kBlockN) * head_dim;
}

inline dim3 flash_grid(const AttentionParams& p) {
  return dim3(ceil_div(p.nq * p.group, kFlashBlockM), p.batch * p.hkv, p.num_splits);
}

inline dim3 combine_grid(const AttentionParams& p) { return dim3(p.batch * p.hq * p.nq); }

constexpr int kCombineThreads = 64;

}  // namespace pf
