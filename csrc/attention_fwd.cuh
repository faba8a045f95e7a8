// Attention forward: one block = 64 packed query rows of one (batch, kv head) against a range of 64-key tiles,
// with an online softmax in fp32 (flash-attention 2). The op contract it implements is in
// perceiver_fast/kernels/api.py: ragged kv_start/kv_len per batch row, bottom-right causal alignment (query i sits
// at key position kv_len - Nq + i), grouped heads, Dqk != Dv, lse in [B, Hq, Nq], zeros and lse = -inf for rows
// that see no key. With num_splits > 1 each split (blockIdx.z) covers a share of the key tiles and leaves a
// partial result for attention_combine.cuh to merge (split-KV, for decoding and for grids too small for the GPU).
//
// Tile is SimtTile or MmaTile (attention_tile.cuh): everything in this file is shared by both. The GPU launcher uses
// this kernel for head dims up to 32 and for rows that are not 16-byte aligned; the rest runs attention_flash.cuh,
// which shares the key ranges, masking, online softmax and output code below.
#pragma once

#include <cmath>

#include "attention_tile.cuh"

namespace pf {

// Copies `rows` rows of `cols` elements into shared memory (row stride ld), zero-filling missing rows (row_ptr
// returns null) and the columns past `cols` up to d_tile: the padding must be 0, not garbage, because the tiles are
// multiplied whole. Wide 16-byte copies where the host said rows are aligned.
template <class T, int ROWS, int D_TILE, class RowPtr>
__device__ __forceinline__ void load_tile(T* dst, int ld, RowPtr row_ptr, int cols, bool vec_ok) {
  constexpr int kChunk = 16 / sizeof(T);
  constexpr int kChunksPerRow = D_TILE / kChunk;
  for (int idx = threadIdx.x; idx < ROWS * kChunksPerRow; idx += kThreads) {
    const int r = idx / kChunksPerRow;
    const int c = (idx % kChunksPerRow) * kChunk;
    const T* src = row_ptr(r);
    T* out = dst + r * ld + c;
    if (src != nullptr && vec_ok && c + kChunk <= cols) {
      *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(src + c);
    } else {
      for (int e = 0; e < kChunk; ++e)
        out[e] = (src != nullptr && c + e < cols) ? src[c + e] : Elem<T>::from_float(0.f);
    }
  }
}

// The keys a forward block works on. Keys this batch row has: [start, len). Causal: query i sees keys
// j <= len - nq + i. The host does not check the bounds of device tensors (reading them back would sync every call),
// so they are clamped here: whatever they hold, no key outside [0, nk) is addressed and the result is that of the
// clamped values. Clamping first also keeps the tile arithmetic clear of int overflow.
struct KeyRange {
  int len, start;
  int unmasked_to;       // keys in [start, unmasked_to) are visible to every row of the block: no mask needed
  int tile_lo, tile_hi;  // the 64-key tiles of this block's split; tiles wholly outside [start, end) are never visited
};

__device__ __forceinline__ KeyRange block_keys(const AttentionParams& p, int b, int row0, int block_rows, int split) {
  KeyRange r;
  const int rows = p.nq * p.group;
  r.len = imin(imax(p.kv_len != nullptr ? p.kv_len[b] : p.nk, 0), p.nk);
  r.start = imin(imax(p.kv_start != nullptr ? p.kv_start[b] : 0, 0), r.len);
  const int first_query = row0 / p.group;
  const int last_query = (imin(row0 + block_rows, rows) - 1) / p.group;
  const int end = p.causal ? imin(r.len, r.len - p.nq + last_query + 1) : r.len;  // keys past `end` nobody here sees
  r.unmasked_to = p.causal ? imin(r.len, r.len - p.nq + first_query + 1) : r.len;
  const int tile_lo = r.start / kBlockN;
  const int tiles = end > r.start ? ceil_div(end, kBlockN) - tile_lo : 0;
  const int per_split = ceil_div(tiles, p.num_splits);
  r.tile_lo = tile_lo + split * per_split;
  r.tile_hi = imin(tile_lo + tiles, r.tile_lo + per_split);
  return r;
}

// The last key packed row `row` sees: len - 1, or its causal edge; -1 for rows past the end (padding of the tile).
__device__ __forceinline__ int last_visible_key(const AttentionParams& p, int len, int row) {
  if (row >= p.nq * p.group) return -1;
  return p.causal ? imin(len - 1, len - p.nq + row / p.group) : len - 1;
}

// Scores to log2 units; with MASKED, keys outside [start, last_key[h]] of the thread's row h become -inf. Only the
// tiles that cross a row's bounds or causal edge take the masked form: the others pay no index arithmetic.
template <int kN, bool MASKED>
__device__ __forceinline__ void scale_scores(float (&s)[kN][4], float scale_log2, int n0, int start,
                                             const int (&last_key)[2], int t) {
  PF_UNROLL
  for (int n = 0; n < kN; ++n)
    PF_UNROLL
    for (int e = 0; e < 4; ++e) {
      float x = s[n][e] * scale_log2;
      if constexpr (MASKED) {
        const int j = n0 + n * 8 + 2 * t + (e & 1);
        if (j < start || j > last_key[e >> 1]) x = -INFINITY;
      }
      s[n][e] = x;
    }
}

// One step of the online softmax over a tile's scores `s` (log2 units, -inf where masked) for the thread's two
// accumulator rows: turns s into exp2(s - running max), rescales O and the running sum to the new max. row_sum is
// this lane's share only; the quad's four shares are added once, at the end (store_rows).
template <int kN, int kD>
__device__ __forceinline__ void online_softmax(float (&s)[kN][4], float (&o)[kD][4], float (&row_max)[2],
                                               float (&row_sum)[2]) {
  PF_UNROLL
  for (int h = 0; h < 2; ++h) {
    float tile_max = -INFINITY;
    PF_UNROLL
    for (int n = 0; n < kN; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
    // The 4 lanes of a quad hold one row between them.
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float new_max = fmaxf(row_max[h], tile_max);
    // A row that has seen no key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
    const float shift = new_max == -INFINITY ? 0.f : new_max;
    const float rescale = exp2f(row_max[h] - shift);
    row_max[h] = new_max;
    float sum = 0.f;
    PF_UNROLL
    for (int n = 0; n < kN; ++n) {
      s[n][2 * h] = exp2f(s[n][2 * h] - shift);
      s[n][2 * h + 1] = exp2f(s[n][2 * h + 1] - shift);
      sum += s[n][2 * h] + s[n][2 * h + 1];
    }
    row_sum[h] = row_sum[h] * rescale + sum;
    PF_UNROLL
    for (int n = 0; n < kD; ++n) {
      o[n][2 * h] *= rescale;
      o[n][2 * h + 1] *= rescale;
    }
  }
}

// The end of a forward block: normalises the thread's two accumulator rows of O (packed rows `row[h]`, columns
// n*8 + 2t + {0, 1}) by their softmax sums and writes them with their lse, into out/lse, or with num_splits > 1 into
// the split's partial buffers (fp32, lse in log2 units) for attention_combine.cuh. Every lane of the warp must call
// it (the row sums are reduced across the quad by shuffles).
template <class T, int kD>
__device__ __forceinline__ void store_rows(const AttentionParams& p, const float (&o)[kD][4], const float (&row_max)[2],
                                           const float (&row_sum)[2], int b, int hk, int split, const int (&row)[2],
                                           int t) {
  const int rows = p.nq * p.group;
  const int q_rows_total = p.batch * p.hq * p.nq;
  PF_UNROLL
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (row[h] >= rows) continue;
    const int query = row[h] / p.group;
    const int head = hk * p.group + row[h] % p.group;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;                       // no visible key: zeros
    const float lse2 = sum > 0.f ? row_max[h] + log2f(sum) : -INFINITY;  // log2 units
    const int lse_index = (b * p.hq + head) * p.nq + query;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.o_sb + query * p.o_sn + head * p.o_sh;
      PF_UNROLL
      for (int n = 0; n < kD; ++n)
        PF_UNROLL
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          const int col = n * 8 + 2 * t + (e & 1);
          if (col < p.dv) out[col] = Elem<T>::from_float(o[n][e] * inv);
        }
      if (t == 0) p.lse[lse_index] = lse2 * 0.69314718055994531f;  // ln 2: back to natural log
    } else {
      float* out = p.part_out + (static_cast<int64_t>(split) * q_rows_total + lse_index) * p.dv;
      PF_UNROLL
      for (int n = 0; n < kD; ++n)
        PF_UNROLL
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          const int col = n * 8 + 2 * t + (e & 1);
          if (col < p.dv) out[col] = o[n][e] * inv;
        }
      if (t == 0) p.part_lse[static_cast<int64_t>(split) * q_rows_total + lse_index] = lse2;
    }
  }
}

template <class T, int D_TILE, class Tile>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(AttentionParams p) {
  constexpr int kN = kBlockN / 8;  // accumulator slices of S
  constexpr int kD = D_TILE / 8;   // accumulator slices of O
  const FragPos f{static_cast<int>(threadIdx.x) / kWarpSize, (static_cast<int>(threadIdx.x) % kWarpSize) / 4,
                  static_cast<int>(threadIdx.x) % 4};
  const int b = blockIdx.y / p.hkv;
  const int hk = blockIdx.y % p.hkv;
  const int split = blockIdx.z;
  const int rows = p.nq * p.group;
  const int row0 = blockIdx.x * kBlockM;

  const KeyRange keys = block_keys(p, b, row0, kBlockM, split);
  const int len = keys.len, start = keys.start, unmasked_to = keys.unmasked_to;
  const int my_lo = keys.tile_lo, my_hi = keys.tile_hi;

  constexpr int ld = smem_row<T>(D_TILE);
  T* sQ = static_cast<T*>(dynamic_smem());
  T* sK = sQ + kBlockM * ld;
  T* sV = sK + kBlockN * ld;
  float* sP = reinterpret_cast<float*>(sV + kBlockN * ld);  // SIMT only: P tile, [kBlockM][kBlockN + 4]

  const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  load_tile<T, kBlockM, D_TILE>(
      sQ, ld,
      [&](int r) -> const T* {
        const int row = row0 + r;
        if (row >= rows) return nullptr;
        return q + (row / p.group) * p.q_sn + (hk * p.group + row % p.group) * p.q_sh;
      },
      p.dqk, p.vec_ok);
  __syncthreads();
  typename Tile::QFrag qfrag;
  Tile::load_q(qfrag, sQ, ld, f);

  // This thread's two rows (e = 0, 2 of the fragment): last visible key, -1 for rows past the end.
  const int last_key[2] = {last_visible_key(p, len, row0 + f.row(0)), last_visible_key(p, len, row0 + f.row(2))};

  float o[kD][4];
  PF_UNROLL
  for (int n = 0; n < kD; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the scores in log2 units
  float row_sum[2] = {0.f, 0.f};              // this lane's part of the running sum of exp2(score - max)

  for (int tile = my_lo; tile < my_hi; ++tile) {
    const int n0 = tile * kBlockN;
    __syncthreads();  // everybody is done with the previous K/V tiles
    // Keys outside [start, len) are never read, only zero-filled: a preallocated cache may hold NaN or inf there,
    // and a masked key still meets V in the whole-tile P·V, where 0 * NaN is NaN. Keys past the causal edge but
    // inside [start, len) are real and loaded: the mask hides their scores from the rows before them, but a NaN or inf
    // value among them still reaches those rows through the same P·V (README: the op's contract on such keys).
    auto key_row = [&](const T* base, int64_t stride) {
      return [=](int r) -> const T* {
        const int j = n0 + r;
        return (j >= start && j < len) ? base + j * stride : nullptr;
      };
    };
    load_tile<T, kBlockN, D_TILE>(sK, ld, key_row(k, p.k_sn), p.dqk, p.vec_ok);
    load_tile<T, kBlockN, D_TILE>(sV, ld, key_row(v, p.v_sn), p.dv, p.vec_ok);
    __syncthreads();

    float s[kN][4];
    Tile::qk(s, qfrag, sQ, sK, ld, p.dqk, f);

    if (n0 < start || n0 + kBlockN > unmasked_to)  // block-uniform
      scale_scores<kN, true>(s, p.scale_log2, n0, start, last_key, f.t);
    else
      scale_scores<kN, false>(s, p.scale_log2, n0, start, last_key, f.t);

    online_softmax<kN, kD>(s, o, row_max, row_sum);
    Tile::pv(o, s, sV, ld, sP, p.dv, f);
  }

  const int rows_of_thread[2] = {row0 + f.row(0), row0 + f.row(2)};
  store_rows<T, kD>(p, o, row_max, row_sum, b, hk, split, rows_of_thread, f.t);
}

}  // namespace pf
