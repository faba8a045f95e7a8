// The fast attention forward for sm_80 and later, head-dim tiles 64 and 128 (FlashAttention-2's structure, written
// for this op's contract). Same contract, key ranges, online softmax and output code as attention_fwd.cuh (its
// helpers are shared); what differs is how data reaches the tensor cores:
//
// - one block = 128 packed query rows (8 warps x 16 rows) of one (batch, kv head) and a split of its 64-key tiles;
//   blocks start with the last query tiles, which under a causal mask have the most keys, so the long blocks do
//   not trail at the end of the grid;
// - K and V tiles go global -> shared with cp.async (16 bytes per copy, zero-filled by the copy itself outside a
//   row's [kv_start, kv_len) and past the head dim) into a ring of kStages slots: tile i+kStages-1 is in flight
//   while tile i is computed, one commit group per tile, one barrier per tile;
// - shared tiles are stored unpadded with their 16-byte chunks XOR-swizzled by row (chunk ^ row % 8), so the 8 rows
//   of every ldmatrix phase and the 8 chunks of every copy phase hit 8 different bank groups;
// - Q is loaded once with ldmatrix into A fragments that stay in registers for the whole key loop; K (ldmatrix)
//   and V (ldmatrix.trans) fragments are B operands of mma.sync.m16n8k16;
// - P never goes through shared memory: the S accumulators of key slices 2c and 2c+1 are, packed to 16 bits, the
//   A fragment of key chunk c in P·V (the C and A fragment layouts of m16n8k16 line up that way);
// - tiles that every row of the block sees whole run without mask arithmetic; only the tiles crossing kv_start,
//   kv_len or the causal diagonal are masked, and a warp skips a diagonal tile that none of its 16 rows reaches.
//
// Everything a layout depends on lives in the configuration (FlashConfig), which the CPU tests also derive broken
// variants from, to show that the emulation catches each kind of mistake.
#pragma once

#include <cmath>

#include "attention_fwd.cuh"
#include "sm80.cuh"

namespace pf {

template <class T, int HEAD_DIM, int STAGES>
struct FlashConfig {
  static_assert(IsMmaType<T>::value, "tensor cores take fp16/bf16");
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "the fast path has head-dim tiles 64 and 128");
  static_assert(STAGES >= 2, "a pipeline needs a slot to fill while another is read");
  using Elem = T;
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kStages = STAGES;
  static constexpr int kBlockM = kFlashBlockM;
  static constexpr int kBlockN = pf::kBlockN;
  static constexpr int kThreads = kFlashThreads;
  // d64 needs about 100 registers: ask for at most 128 so that two blocks (16 warps) share an SM. d128 holds
  // 64 O + 32 S + 32 Q accumulator registers per thread: one block per SM.
  static constexpr int kMinBlocksPerSm = HEAD_DIM <= 64 ? 2 : 1;
  static constexpr int kChunks = HEAD_DIM * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks per tile row
  // Committed groups that may still be in flight at the top of an iteration: all but the one holding its tile.
  static constexpr int kPendingAtWait = STAGES - 2;

  // Element offset of 16-byte chunk `chunk` of tile row `row`. An unpadded row of 64 (128) elements is one (two)
  // full 128-byte bank cycles, so without the XOR the 8 rows an ldmatrix phase reads would share one bank group.
  __device__ __forceinline__ static int offset(int row, int chunk) {
    return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3);
  }

  // A fragment of the warp's 16 Q rows, head-dim slice kk (16 wide): lanes 0-15 address rows 0-15 of the left 8
  // columns, lanes 16-31 the right 8; matrices 0..3 are then a0..a3.
  __device__ __forceinline__ static void load_q(uint32_t (&a)[4], const T* sQ, int warp_row, int kk, int lane) {
    ldmatrix_x4(a, sQ + offset(warp_row + (lane & 15), 2 * kk + (lane >> 4)));
  }

  // B fragments of K^T for key slices n and n+1 (8 keys each), head-dim slice kk: b0 = K[key g][2t..2t+1] is a
  // plain ldmatrix of key rows. Matrices: (n, left 8 dims), (n, right 8), (n+1, left), (n+1, right).
  __device__ __forceinline__ static void load_k(uint32_t (&b)[4], const T* sK, int n, int kk, int lane) {
    ldmatrix_x4(b, sK + offset(n * 8 + ((lane >> 4) << 3) + (lane & 7), 2 * kk + ((lane >> 3) & 1)));
  }

  // B fragments of V for key chunk c (16 keys) and head-dim slices n and n+1: b0 = (V[2t][g], V[2t+1][g]) is two
  // keys of one column, a transposed ldmatrix of key rows. Matrices: (keys 0-7, slice n), (keys 8-15, slice n),
  // (keys 0-7, slice n+1), (keys 8-15, slice n+1).
  __device__ __forceinline__ static void load_v(uint32_t (&b)[4], const T* sV, int c, int n, int lane) {
    ldmatrix_x4_trans(b, sV + offset(c * 16 + (((lane >> 3) & 1) << 3) + (lane & 7), n + (lane >> 4)));
  }

  // A fragment of P for key chunk c, straight from the S accumulators: a0 = P[g][16c+2t..] is s[2c][0..1], a1 the
  // same 8 rows further (s[2c][2..3]), a2/a3 the next 8 keys (slice 2c+1).
  __device__ __forceinline__ static void p_fragment(uint32_t (&a)[4], const float (&s)[kBlockN / 8][4], int c) {
    a[0] = pack_floats<T>(s[2 * c][0], s[2 * c][1]);
    a[1] = pack_floats<T>(s[2 * c][2], s[2 * c][3]);
    a[2] = pack_floats<T>(s[2 * c + 1][0], s[2 * c + 1][1]);
    a[3] = pack_floats<T>(s[2 * c + 1][2], s[2 * c + 1][3]);
  }
};

// Issues the cp.async copies of a ROWS-row tile into shared memory (swizzled). A row with no source (row_ptr gives
// null) and the columns past `cols` are zero-filled by the copy's src-size, so nothing outside [0, cols) of an
// existing row is read; `any_row` is a valid address to name when nothing is to be read.
template <class Cfg, int ROWS, class RowPtr>
__device__ __forceinline__ void copy_tile_async(typename Cfg::Elem* dst, RowPtr row_ptr, int cols,
                                                const typename Cfg::Elem* any_row) {
  using T = typename Cfg::Elem;
  static_assert(ROWS * Cfg::kChunks % Cfg::kThreads == 0, "every thread issues the same number of copies");
  constexpr int kElems = 16 / sizeof(T);
  // Consecutive threads take consecutive chunks of a row: a warp reads 2-4 whole rows, coalesced.
  PF_UNROLL
  for (int i = 0; i < ROWS * Cfg::kChunks / Cfg::kThreads; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * Cfg::kThreads;
    const int r = idx / Cfg::kChunks, c = idx % Cfg::kChunks;
    const T* src = row_ptr(r);
    const int elems = src == nullptr ? 0 : imax(0, imin(kElems, cols - c * kElems));
    cp_async_16(dst + Cfg::offset(r, c), elems > 0 ? src + c * kElems : any_row, elems * static_cast<int>(sizeof(T)));
  }
}

// One 64-key tile for the warp's 16 rows: S = Q K^T, mask (MASKED only), online softmax, O += P V.
template <class Cfg, bool MASKED>
__device__ __forceinline__ void flash_tile(float (&o)[Cfg::kHeadDim / 8][4], float (&row_max)[2], float (&row_sum)[2],
                                           const uint32_t (&qa)[Cfg::kHeadDim / 16][4], const typename Cfg::Elem* sK,
                                           const typename Cfg::Elem* sV, const AttentionParams& p, int n0, int start,
                                           const int (&last_key)[2], int lane) {
  using T = typename Cfg::Elem;
  constexpr int kN = Cfg::kBlockN / 8;
  constexpr int kD = Cfg::kHeadDim / 8;
  float s[kN][4];
  PF_UNROLL
  for (int n = 0; n < kN; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
  PF_UNROLL
  for (int kk = 0; kk < Cfg::kHeadDim / 16; ++kk) {
    if (kk * 16 >= p.dqk) break;  // the tile's zero padding past Dqk adds nothing
    PF_UNROLL
    for (int n = 0; n < kN; n += 2) {
      uint32_t b[4];
      Cfg::load_k(b, sK, n, kk, lane);
      mma_16816<T>(s[n], qa[kk], b[0], b[1]);
      mma_16816<T>(s[n + 1], qa[kk], b[2], b[3]);
    }
  }
  scale_scores<kN, MASKED>(s, p.scale_log2, n0, start, last_key, lane % 4);
  online_softmax<kN, kD>(s, o, row_max, row_sum);
  PF_UNROLL
  for (int c = 0; c < Cfg::kBlockN / 16; ++c) {
    uint32_t a[4];
    Cfg::p_fragment(a, s, c);
    PF_UNROLL
    for (int n = 0; n < kD; n += 2) {
      if (n * 8 >= p.dv) break;  // columns past Dv are never written
      uint32_t b[4];
      Cfg::load_v(b, sV, c, n, lane);
      mma_16816<T>(o[n], a, b[0], b[1]);
      mma_16816<T>(o[n + 1], a, b[2], b[3]);
    }
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSm) attention_fwd_flash_kernel(AttentionParams p) {
  using T = typename Cfg::Elem;
  constexpr int kM = Cfg::kBlockM, kN = Cfg::kBlockN, kHD = Cfg::kHeadDim, kStages = Cfg::kStages;
  constexpr int kD = kHD / 8;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp_row = static_cast<int>(threadIdx.x) / kWarpSize * 16;  // the warp's first row in the block
  const int b = blockIdx.y / p.hkv;
  const int hk = blockIdx.y % p.hkv;
  const int split = blockIdx.z;
  const int rows = p.nq * p.group;
  const int row0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kM;

  const KeyRange keys = block_keys(p, b, row0, kM, split);
  const int len = keys.len, start = keys.start;
  const int tiles = imax(0, keys.tile_hi - keys.tile_lo);

  // The thread's two rows (accumulator elements 0-1 and 2-3), and the last key any row of the warp sees.
  const int my_rows[2] = {row0 + warp_row + lane / 4, row0 + warp_row + lane / 4 + 8};
  const int last_key[2] = {last_visible_key(p, len, my_rows[0]), last_visible_key(p, len, my_rows[1])};
  const int warp_last_key =
      row0 + warp_row < rows ? last_visible_key(p, len, imin(row0 + warp_row + 15, rows - 1)) : -1;

  float o[kD][4];
  PF_UNROLL
  for (int n = 0; n < kD; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the scores in log2 units
  float row_sum[2] = {0.f, 0.f};              // this lane's part of the running sum of exp2(score - max)

  if (tiles > 0) {  // block-uniform: the barriers below are reached by all or none
    T* sQ = static_cast<T*>(dynamic_smem());
    T* sK = sQ + kM * kHD;
    T* sV = sK + kStages * kN * kHD;
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb;
    const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

    // Keys outside [start, len) are never read, only zero-filled: a preallocated cache may hold NaN or inf there,
    // and a masked key still meets V in the whole-tile P·V, where 0 * NaN is NaN. Keys past the causal edge but
    // inside [start, len) are real and loaded: the mask hides their scores from the rows before them, but a NaN or inf
    // value among them still reaches those rows through the same P·V (README: the op's contract on such keys).
    auto issue_tile = [&](int tile, int slot) {
      const int n0 = tile * kN;
      auto key_row = [&](const T* base, int64_t stride) {
        return [=](int r) -> const T* {
          const int j = n0 + r;
          return j >= start && j < len ? base + j * stride : nullptr;
        };
      };
      copy_tile_async<Cfg, kN>(sK + slot * kN * kHD, key_row(k, p.k_sn), p.dqk, k);
      copy_tile_async<Cfg, kN>(sV + slot * kN * kHD, key_row(v, p.v_sn), p.dv, v);
    };

    // Prologue: Q and the first kStages - 1 tiles, one commit group per tile (Q rides with the first).
    copy_tile_async<Cfg, kM>(
        sQ,
        [&](int r) -> const T* {
          const int row = row0 + r;
          if (row >= rows) return nullptr;
          return q + (row / p.group) * p.q_sn + (hk * p.group + row % p.group) * p.q_sh;
        },
        p.dqk, q);
    PF_UNROLL
    for (int i = 0; i < kStages - 1; ++i) {
      if (i < tiles) issue_tile(keys.tile_lo + i, i);
      cp_async_commit();
    }
    cp_async_wait<Cfg::kPendingAtWait>();
    __syncthreads();
    uint32_t qa[kHD / 16][4];
    PF_UNROLL
    for (int kk = 0; kk < kHD / 16; ++kk) Cfg::load_q(qa[kk], sQ, warp_row, kk, lane);

    int read_slot = 0, write_slot = kStages - 1;
    for (int i = 0; i < tiles; ++i) {
      if (i > 0) {
        // This thread's copies of tile i have landed; after the barrier everybody's have, and everybody is done
        // with the slot that tile i + kStages - 1 is about to overwrite (it held tile i - 1).
        cp_async_wait<Cfg::kPendingAtWait>();
        __syncthreads();
      }
      if (i + kStages - 1 < tiles) issue_tile(keys.tile_lo + i + kStages - 1, write_slot);
      cp_async_commit();  // empty groups at the end keep the group count, and so the wait depth, uniform
      write_slot = write_slot + 1 == kStages ? 0 : write_slot + 1;

      const int n0 = (keys.tile_lo + i) * kN;
      const T* tK = sK + read_slot * kN * kHD;
      const T* tV = sV + read_slot * kN * kHD;
      read_slot = read_slot + 1 == kStages ? 0 : read_slot + 1;
      // Warp-uniform: rows past the end, or a diagonal tile beyond every row of the warp, cost no math.
      if (n0 > warp_last_key) continue;
      if (n0 < start || n0 + kN > keys.unmasked_to)  // block-uniform
        flash_tile<Cfg, true>(o, row_max, row_sum, qa, tK, tV, p, n0, start, last_key, lane);
      else
        flash_tile<Cfg, false>(o, row_max, row_sum, qa, tK, tV, p, n0, start, last_key, lane);
    }
  }

  store_rows<T, kD>(p, o, row_max, row_sum, b, hk, split, my_rows, lane % 4);
}

}  // namespace pf
