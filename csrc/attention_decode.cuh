// One decoding step of Perceiver AR's cached self-attention in a single launch: rotary on the new query and key,
// the new key/value stored into the static cache, and attention of the query over the cache (split-KV when
// num_splits > 1, merged by attention_combine.cuh). It replaces the unfused path's separate launches (rotations,
// cache writes, attention) and the round trips of q and k through memory between them.
//
// Decoding has one query row per head: there is nothing for tensor cores to tile, and the step reads the whole
// cache for a handful of multiply-adds per element, so it is memory-bound. The kernel is SIMT, fp32 throughout,
// built to keep many key rows in flight:
//
// - one block = one (batch row, kv head, split); its G = Hq / Hkv query heads share every key and value it loads;
// - each half-warp (16 lanes) takes a key at a time, each lane a contiguous chunk of D_TILE / 16 elements of the
//   row (one 16-byte load at d128), so a warp reads two adjacent cache rows (the cache is head-major: adjacent
//   positions are adjacent in memory); a half-warp takes kU keys per iteration and issues all their K and V loads
//   before any arithmetic;
// - the G x kU partial dot products are summed over the half-warp by a reduce-scatter (each xor level halves what a
//   lane holds) and then gathered back: about 2G x kU shuffles instead of 4G x kU for a butterfly per value;
// - online softmax in base 2 per half-warp, then the 8 half-warps' (max, sum, acc) merge through shared memory.
//
// The new key and value: every block reads the keys of its range from the cache except the one at position[b],
// which it takes from its own shared-memory copy of the rotated new key. Blocks do not wait for each other, so no
// block may count on another having stored it; the last split's block stores it, after its own loop, which also
// lets the CPU tests (blocks run in grid order there) see a block that wrongly reads the cache at that position.
//
// Rotary follows the model exactly (perceiver_fast/models/core/position.py, `x * cos + rot(x) * sin` in fp32 on
// T inputs, then rounded to T): the products and the sum are rounded separately (no fma), so the key stored here
// is bit-identical to what the unfused path would store.
#pragma once

#include <cmath>
#include <cstring>

#include "attention_combine.cuh"

namespace pf {

struct DecodeParams {
  // The fields the combine kernel also reads (out, lse, workspace, batch, hq, nq = 1, dv, num_splits), and q, the
  // bounds and the cache strides (k_s*, v_s*: [B, C, Hkv, D] views); nk is the cache capacity C; vec_ok is about
  // the cache rows only (the new rows are read once, element by element). attn.k and attn.v are unused: the caches
  // are written, so they travel as k_cache/v_cache.
  AttentionParams attn;
  void* k_cache;  // [B, C, Hkv, Dqk]
  void* v_cache;  // [B, C, Hkv, Dv]
  const void* k_new;  // [B, 1, Hkv, Dqk], not rotated
  const void* v_new;  // [B, 1, Hkv, Dv]
  int64_t kn_sb, kn_sh;  // strides in elements (the seq dim has one row)
  int64_t vn_sb, vn_sh;
  const int* position;  // [B]: the cache row the new key/value go to; outside [0, C) they are not stored
  // Elements between batch rows of position, attn.kv_start and attn.kv_len: a caller may pass one position for
  // every row as an expanded tensor (stride 0), or bounds sliced from a larger tensor.
  int64_t position_stride, kv_start_stride, kv_len_stride;
  const float* cos;     // [B, rotary_dim], contiguous; the same angles for every head
  const float* sin;
  int rotary_dim;  // channels [0, rotary_dim) are rotated in pairs; 0: no rotary
};

constexpr int kDecodeThreads = 128;
constexpr int kDecodeLanes = 16;  // lanes per key
constexpr int kDecodeHalfWarps = kDecodeThreads / kDecodeLanes;
constexpr int kMaxDecodeGroup = 8;

// The query heads per kv head a kernel is compiled for (the next power of two; padding heads are computed and
// dropped), 0 when above kMaxDecodeGroup: their q and accumulators live in registers.
__host__ __device__ constexpr int decode_group_tile(int group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : group <= kMaxDecodeGroup ? 8 : 0;
}

// Keys a half-warp loads per iteration, so that a lane has 64 bytes of K and V in flight whatever the tile (d128:
// 2 keys x 16 bytes each of K and V; d64: 4 x 8 x 2). At d128 with 8 q heads the kernel needs about 215 registers
// with 2 keys (ptxas, sm_80/sm_90): 4 would not fit in 255.
__host__ __device__ constexpr int decode_keys_per_lane(int d_tile) { return d_tile >= 128 ? 2 : 4; }

// Rotated queries, new key and new value rows (T), then per half-warp its accumulators, running max and sum.
template <class T>
__host__ __device__ constexpr std::size_t decode_smem_bytes(int d_tile, int group_tile) {
  return sizeof(T) * static_cast<std::size_t>(group_tile + 2) * d_tile +
         sizeof(float) * static_cast<std::size_t>(kDecodeHalfWarps) * group_tile * (d_tile + 2);
}

// x: split, y: (batch row, kv head). Splits of one (b, kv head) are neighbours, and the CPU shim runs x fastest,
// so the storing split (the last) runs after the others there.
inline dim3 decode_grid(const DecodeParams& p) { return dim3(p.attn.num_splits, p.attn.batch * p.attn.hkv); }

// fp32 operations that the compiler must not contract into fma: the rotation rounds like torch's separate kernels.
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fmul_rn(a, b);
#else
  // g++ contracts C++ by default (-ffp-contract=fast) where the target has fma (aarch64, -march=native): a product
  // that goes through memory cannot be fused with the sum after it.
  volatile float product = a * b;
  return product;
#endif
}
__device__ __forceinline__ float add_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__device__ __forceinline__ float sub_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

struct KeySpan {
  int lo, hi;  // keys [lo, hi) of this split
};

// The steps a broken variant of the kernel may replace (csrc/shim_attention.cpp); the kernel takes them as a
// template argument so the CPU tests can show that each mistake is caught.
struct DecodeSteps {
  // (y0, y1) = (x0, x1) * cos + (-x1, x0) * sin for one channel pair; cos/sin point at the pair's two angles.
  __device__ __forceinline__ static void rotate(float x0, float x1, const float* cos, const float* sin, float& y0,
                                                float& y1) {
    y0 = sub_rn(mul_rn(x0, cos[0]), mul_rn(x1, sin[0]));
    y1 = add_rn(mul_rn(x1, cos[1]), mul_rn(x0, sin[1]));
  }

  // The key at position[b] comes from the block's own copy of the new key, never from the cache.
  static constexpr bool kOwnNewKey = true;

  // Keys [start, len) cut into num_splits contiguous runs of equal length (the last ones may be empty).
  __device__ __forceinline__ static KeySpan split_keys(int start, int len, int num_splits, int split) {
    const int per_split = ceil_div(len - start, num_splits);
    KeySpan s;
    s.lo = imin(len, start + split * per_split);
    s.hi = imin(len, s.lo + per_split);
    return s;
  }

  // A half-warp's sum and accumulator were kept relative to its own running max m; shift is the block's max.
  __device__ __forceinline__ static float merge_weight(float m, float shift) { return exp2f(m - shift); }
};

// Copies V (4, 8 or 16 bytes, 16 at most) from src to dst as one load; the caller checked the alignment.
template <class V, class T>
__device__ __forceinline__ void copy_vector(T* dst, const T* src) {
#if defined(__CUDACC__)
  *reinterpret_cast<V*>(dst) = *reinterpret_cast<const V*>(src);
#else
  if (reinterpret_cast<std::uintptr_t>(src) % alignof(V) != 0) pf_shim::fault("misaligned vector load");
  std::memcpy(dst, src, sizeof(V));
#endif
}

// x = the N elements at src as fp32, or zeros when !inside. With vec, src is aligned to the chunk's size (16 bytes
// at most): a lane's chunk starts at a multiple of its size in a 16-byte aligned row.
template <class T, int N>
__device__ __forceinline__ void load_chunk(float (&x)[N], const T* src, bool inside, bool vec) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  alignas(16) T buf[N];
  if (inside && vec) {
    if constexpr (kBytes >= 16) {
      static_assert(kBytes % 16 == 0, "a chunk is a whole number of 16-byte vectors");
      PF_UNROLL
      for (int i = 0; i < kBytes / 16; ++i) copy_vector<uint4>(buf + i * (16 / sizeof(T)), src + i * (16 / sizeof(T)));
    } else if constexpr (kBytes == 8) {
      copy_vector<uint2>(buf, src);
    } else {
      static_assert(kBytes == 4, "chunks of 4, 8 or 16k bytes");
      copy_vector<unsigned>(buf, src);
    }
  } else {
    PF_UNROLL
    for (int e = 0; e < N; ++e) buf[e] = inside ? src[e] : Elem<T>::from_float(0.f);
  }
  PF_UNROLL
  for (int e = 0; e < N; ++e) x[e] = Elem<T>::to_float(buf[e]);
}

// Reduce-scatter over the 16 lanes of a half-warp, one xor level per call (MASK = 8, 4, 2, 1): while a lane holds
// more than one value it keeps half (the upper half where its MASK bit is set), adds the partner's copy of that
// half and sends the other; a single value is summed whole. After the four levels lane l holds, in slot i, the full
// sum of value i + sum over the halving levels of (l & MASK ? half : 0). Every lane of the warp must call it.
template <int COUNT, int MASK, int NV>
__device__ __forceinline__ void reduce_scatter(float (&x)[NV], int lane) {
  if constexpr (MASK > 0) {
    if constexpr (COUNT > 1) {
      constexpr int kHalf = COUNT / 2;
      const bool upper = (lane & MASK) != 0;
      PF_UNROLL
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? x[i] : x[i + kHalf];
        const float keep = upper ? x[i + kHalf] : x[i];
        x[i] = keep + __shfl_xor_sync(0xffffffffu, send, MASK);
      }
      reduce_scatter<kHalf, MASK / 2>(x, lane);
    } else {
      x[0] += __shfl_xor_sync(0xffffffffu, x[0], MASK);
      reduce_scatter<1, MASK / 2>(x, lane);
    }
  }
}

// The NV values summed over each half-warp, every lane ending with all NV sums (NV a power of two).
template <int NV>
__device__ __forceinline__ void half_warp_sum(const float (&in)[NV], float (&out)[NV], int lane) {
  constexpr int kLeft = NV > kDecodeLanes ? NV / kDecodeLanes : 1;  // slots a lane holds after the scatter
  float x[NV];
  PF_UNROLL
  for (int i = 0; i < NV; ++i) x[i] = in[i];
  reduce_scatter<NV, kDecodeLanes / 2>(x, lane);
  PF_UNROLL
  for (int v = 0; v < NV; ++v) {
    // The lane holding value v: its MASK bit is set where v has the bit of that level's half.
    int source = 0;
    PF_UNROLL
    for (int level = 0, half = NV / 2; level < 4 && half >= kLeft; ++level, half /= 2)
      if (v & half) source |= (kDecodeLanes / 2) >> level;
    out[v] = __shfl_sync(0xffffffffu, x[v % kLeft], (lane & ~(kDecodeLanes - 1)) | source);
  }
}

template <class T, int D_TILE, int GROUP, class Steps = DecodeSteps>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_kernel(DecodeParams dp) {
  constexpr int kN = D_TILE / kDecodeLanes;  // elements of a row per lane
  constexpr int kU = decode_keys_per_lane(D_TILE);
  constexpr int kPerIter = kDecodeHalfWarps * kU;
  constexpr int kPairs = D_TILE / 2;
  static_assert(D_TILE == 32 || D_TILE == 64 || D_TILE == 128, "head-dim tiles 32, 64, 128");
  static_assert(GROUP == 1 || GROUP == 2 || GROUP == 4 || GROUP == 8, "group tiles 1, 2, 4, 8");
  const AttentionParams& p = dp.attn;
  const int tid = static_cast<int>(threadIdx.x);
  const int half = tid / kDecodeLanes;
  const int lane = tid % kWarpSize;  // the shuffles' lane; its low 4 bits are the lane within the half-warp
  const int col = (tid % kDecodeLanes) * kN;
  const int split = blockIdx.x;
  const int b = blockIdx.y / p.hkv;
  const int hk = blockIdx.y % p.hkv;

  T* sQ = static_cast<T*>(dynamic_smem());  // [GROUP][D_TILE], rotated and rounded to T
  T* sK = sQ + GROUP * D_TILE;              // [D_TILE]: the new key, rotated
  T* sV = sK + D_TILE;                      // [D_TILE]: the new value
  float* sAcc = reinterpret_cast<float*>(sV + D_TILE);  // [half-warps][GROUP][D_TILE]
  float* sMax = sAcc + kDecodeHalfWarps * GROUP * D_TILE;  // [half-warps][GROUP]
  float* sSum = sMax + kDecodeHalfWarps * GROUP;

  // Rotate the block's query heads and the new key into shared memory, a channel pair per thread; columns past
  // Dqk and padding heads are zeros, so the dot products may run over the whole tile.
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + hk * p.group * p.q_sh;
    const T* k_new = static_cast<const T*>(dp.k_new) + b * dp.kn_sb + hk * dp.kn_sh;
    const float* cos = dp.cos + static_cast<int64_t>(b) * dp.rotary_dim;
    const float* sin = dp.sin + static_cast<int64_t>(b) * dp.rotary_dim;
    for (int idx = tid; idx < (GROUP + 1) * kPairs; idx += kDecodeThreads) {
      const int row = idx / kPairs;
      const int c = 2 * (idx % kPairs);
      const T* src = row < GROUP ? (row < p.group ? q + row * p.q_sh : nullptr) : k_new;
      float x0 = 0.f, x1 = 0.f;
      if (src != nullptr && c < p.dqk) x0 = Elem<T>::to_float(src[c]);
      if (src != nullptr && c + 1 < p.dqk) x1 = Elem<T>::to_float(src[c + 1]);
      float y0 = x0, y1 = x1;
      if (c + 1 < dp.rotary_dim) Steps::rotate(x0, x1, cos + c, sin + c, y0, y1);
      T* dst = (row < GROUP ? sQ + row * D_TILE : sK) + c;
      dst[0] = Elem<T>::from_float(y0);
      dst[1] = Elem<T>::from_float(y1);
    }
    const T* v_new = static_cast<const T*>(dp.v_new) + b * dp.vn_sb + hk * dp.vn_sh;
    for (int c = tid; c < D_TILE; c += kDecodeThreads) sV[c] = c < p.dv ? v_new[c] : Elem<T>::from_float(0.f);
  }
  __syncthreads();

  const bool qk_cols = col < p.dqk;  // whole chunks: the head dims are multiples of 8, a chunk is 2, 4 or 8
  const bool v_cols = col < p.dv;
  float q[GROUP][kN];
  PF_UNROLL
  for (int g = 0; g < GROUP; ++g) load_chunk<T, kN>(q[g], sQ + g * D_TILE + col, qk_cols, true);

  // The key range: clamped like block_keys (attention_fwd.cuh), the host does not read device bounds.
  const int len = imin(imax(p.kv_len != nullptr ? p.kv_len[b * dp.kv_len_stride] : p.nk, 0), p.nk);
  const int start = imin(imax(p.kv_start != nullptr ? p.kv_start[b * dp.kv_start_stride] : 0, 0), len);
  const KeySpan keys = Steps::split_keys(start, len, p.num_splits, split);
  const int pos = dp.position[b * dp.position_stride];
  const T* k_cache = static_cast<const T*>(dp.k_cache) + b * p.k_sb + hk * p.k_sh;
  const T* v_cache = static_cast<const T*>(dp.v_cache) + b * p.v_sb + hk * p.v_sh;
  const bool vec = p.vec_ok != 0;

  float acc[GROUP][kN];
  float row_max[GROUP], row_sum[GROUP];  // per query head, in log2 units; the same in all 16 lanes
  PF_UNROLL
  for (int g = 0; g < GROUP; ++g) {
    row_max[g] = -INFINITY;
    row_sum[g] = 0.f;
    PF_UNROLL
    for (int e = 0; e < kN; ++e) acc[g][e] = 0.f;
  }

  // The same trip count for every thread: keys past hi are masked, never branched around (the shuffles need the
  // whole warp).
  const int iterations = keys.hi > keys.lo ? ceil_div(keys.hi - keys.lo, kPerIter) : 0;
  for (int it = 0; it < iterations; ++it) {
    float kx[kU][kN], vx[kU][kN];
    bool valid[kU];
    PF_UNROLL
    for (int u = 0; u < kU; ++u) {
      const int j = keys.lo + it * kPerIter + u * kDecodeHalfWarps + half;
      valid[u] = j < keys.hi;
      const bool from_cache = valid[u] && !(Steps::kOwnNewKey && j == pos);
      const int row = from_cache ? j : 0;  // no address is formed outside the range
      load_chunk<T, kN>(kx[u], k_cache + row * p.k_sn + col, from_cache && qk_cols, vec);
      load_chunk<T, kN>(vx[u], v_cache + row * p.v_sn + col, from_cache && v_cols, vec);
    }
    PF_UNROLL
    for (int u = 0; u < kU; ++u) {
      const int j = keys.lo + it * kPerIter + u * kDecodeHalfWarps + half;
      if (Steps::kOwnNewKey && valid[u] && j == pos) {  // one key per block, no shuffle inside
        load_chunk<T, kN>(kx[u], sK + col, true, true);
        load_chunk<T, kN>(vx[u], sV + col, true, true);
      }
    }

    float part[kU * GROUP], score[kU * GROUP];
    PF_UNROLL
    for (int u = 0; u < kU; ++u)
      PF_UNROLL
      for (int g = 0; g < GROUP; ++g) {
        float s = 0.f;
        PF_UNROLL
        for (int e = 0; e < kN; ++e) s += q[g][e] * kx[u][e];
        part[u * GROUP + g] = s;
      }
    half_warp_sum<kU * GROUP>(part, score, lane);

    PF_UNROLL
    for (int g = 0; g < GROUP; ++g) {
      float x[kU];
      float new_max = row_max[g];
      PF_UNROLL
      for (int u = 0; u < kU; ++u) {
        x[u] = valid[u] ? score[u * GROUP + g] * p.scale_log2 : -INFINITY;
        new_max = fmaxf(new_max, x[u]);
      }
      // Nothing seen yet: subtracting 0 instead of -inf keeps exp2 at 0 rather than NaN.
      const float shift = new_max == -INFINITY ? 0.f : new_max;
      const float rescale = exp2f(row_max[g] - shift);
      row_max[g] = new_max;
      row_sum[g] *= rescale;
      PF_UNROLL
      for (int e = 0; e < kN; ++e) acc[g][e] *= rescale;
      PF_UNROLL
      for (int u = 0; u < kU; ++u) {
        const float prob = exp2f(x[u] - shift);
        row_sum[g] += prob;
        PF_UNROLL
        for (int e = 0; e < kN; ++e) acc[g][e] += prob * vx[u][e];
      }
    }
  }

  PF_UNROLL
  for (int g = 0; g < GROUP; ++g) {
    PF_UNROLL
    for (int e = 0; e < kN; ++e) sAcc[(half * GROUP + g) * D_TILE + col + e] = acc[g][e];
    if (tid % kDecodeLanes == 0) {
      sMax[half * GROUP + g] = row_max[g];
      sSum[half * GROUP + g] = row_sum[g];
    }
  }
  __syncthreads();

  // The block's result per (head, column): the half-warps' parts rescaled to the block's max. Each thread redoes
  // the few exp2 of its head's weights rather than sharing them through another barrier.
  const int q_rows_total = p.batch * p.hq;
  for (int idx = tid; idx < p.group * p.dv; idx += kDecodeThreads) {
    const int g = idx / p.dv, d = idx % p.dv;
    float block_max = -INFINITY;
    PF_UNROLL
    for (int h = 0; h < kDecodeHalfWarps; ++h) block_max = fmaxf(block_max, sMax[h * GROUP + g]);
    const float shift = block_max == -INFINITY ? 0.f : block_max;
    float sum = 0.f, o = 0.f;
    PF_UNROLL
    for (int h = 0; h < kDecodeHalfWarps; ++h) {
      const float w = Steps::merge_weight(sMax[h * GROUP + g], shift);
      sum += w * sSum[h * GROUP + g];
      o += w * sAcc[(h * GROUP + g) * D_TILE + d];
    }
    const int head = hk * p.group + g;
    const int row = b * p.hq + head;  // the lse layout [B, Hq, 1]
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no key in this split: zeros
    const float lse2 = sum > 0.f ? block_max + log2f(sum) : -INFINITY;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.o_sb + head * p.o_sh;
      out[d] = Elem<T>::from_float(o * inv);
      if (d == 0) p.lse[row] = lse2 * 0.69314718055994531f;  // ln 2: back to natural log
    } else {
      const int64_t part = static_cast<int64_t>(split) * q_rows_total + row;
      p.part_out[part * p.dv + d] = o * inv;
      if (d == 0) p.part_lse[part] = lse2;
    }
  }

  // The last split stores the new row, after its own reads (see the top of the file).
  if (split == p.num_splits - 1 && pos >= 0 && pos < p.nk) {
    T* k_row = static_cast<T*>(dp.k_cache) + b * p.k_sb + static_cast<int64_t>(pos) * p.k_sn + hk * p.k_sh;
    T* v_row = static_cast<T*>(dp.v_cache) + b * p.v_sb + static_cast<int64_t>(pos) * p.v_sn + hk * p.v_sh;
    for (int c = tid; c < p.dqk; c += kDecodeThreads) k_row[c] = sK[c];
    for (int c = tid; c < p.dv; c += kDecodeThreads) v_row[c] = sV[c];
  }
}

}  // namespace pf
