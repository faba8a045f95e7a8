// The two inner products of a 64x64 attention tile, S = Q·K^T and O += P·V, in two interchangeable flavours:
//   MmaTile  - tensor cores (sm_80 mma.sync.m16n8k16, fp16/bf16 operands, fp32 accumulate); on the CPU it runs
//              with the instruction emulated (cpu_mma.h), which checks the fragment code without a GPU;
//   SimtTile - plain fp32 dot products, any storage type; it runs on the CPU through cpu_shim.h.
// Both leave their results in the same per-thread layout, the accumulator fragment of mma.m16n8k16, so the tiling,
// masking and online softmax around them (attention_fwd.cuh) are one piece of code, tested on the CPU with both.
//
// Fragment layout (PTX ISA, "mma.m16n8k16"): warp w owns tile rows w*16 .. w*16+15. Lane = 4*g + t. For an
// accumulator acc[n][e] over 8-column slice n: row = w*16 + g + 8*(e/2), column = n*8 + 2*t + e%2.
#pragma once

#include "attention_params.cuh"

namespace pf {

struct FragPos {
  int warp, g, t;
  __device__ __forceinline__ int row(int e) const { return warp * 16 + g + 8 * (e >> 1); }
  __device__ __forceinline__ int col(int n, int e) const { return n * 8 + 2 * t + (e & 1); }
};

template <class T, int D_TILE>
struct SimtTile {
  static constexpr bool kSimt = true;
  struct QFrag {};  // reads Q from shared memory each time

  __device__ __forceinline__ static void load_q(QFrag&, const T*, int, const FragPos&) {}

  // s[n][e] = sum_d Q[row][d] * K[col][d]
  __device__ static void qk(float (&s)[kBlockN / 8][4], const QFrag&, const T* sQ, const T* sK, int ld, int dqk,
                            const FragPos& f) {
    for (int n = 0; n < kBlockN / 8; ++n)
      for (int e = 0; e < 4; ++e) {
        const T* qrow = sQ + f.row(e) * ld;
        const T* krow = sK + f.col(n, e) * ld;
        float acc = 0.f;
        for (int d = 0; d < dqk; ++d) acc += Elem<T>::to_float(qrow[d]) * Elem<T>::to_float(krow[d]);
        s[n][e] = acc;
      }
  }

  // o[n][e] += sum_c P[row][c] * V[c][col]. A row of P is spread over the 4 lanes of a quad, so it goes through
  // shared memory (sP, this warp's 16 rows) instead of 64 shuffles per element.
  __device__ static void pv(float (&o)[D_TILE / 8][4], const float (&p)[kBlockN / 8][4], const T* sV, int ld,
                            float* sP, int dv, const FragPos& f) {
    constexpr int ldp = kBlockN + 4;
    for (int n = 0; n < kBlockN / 8; ++n)
      for (int e = 0; e < 4; ++e) sP[f.row(e) * ldp + f.col(n, e)] = p[n][e];
    __syncwarp();
    for (int n = 0; n < D_TILE / 8; ++n)
      for (int e = 0; e < 4; ++e) {
        const int col = f.col(n, e);
        if (col >= dv) continue;
        const float* prow = sP + f.row(e) * ldp;
        float acc = 0.f;
        for (int c = 0; c < kBlockN; ++c) acc += prow[c] * Elem<T>::to_float(sV[c * ld + col]);
        o[n][e] += acc;
      }
    __syncwarp();  // the next tile overwrites sP
  }
};

__device__ __forceinline__ uint32_t ld_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t pack_u16(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// The tensor-core primitives per platform: fp16/bf16 mma.sync on the GPU, emulated by cpu_mma.h on the CPU.
template <class T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi);

template <class T>
struct IsMmaType : std::false_type {};

#if defined(__CUDACC__)

template <>
struct IsMmaType<__half> : std::true_type {};
template <>
struct IsMmaType<__nv_bfloat16> : std::true_type {};

template <>
__device__ __forceinline__ uint32_t pack_floats<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // lo goes to the low 16 bits
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack_floats<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// acc += A (16x16, row-major fragment a) * B (16x8, column fragment b0/b1), fp32 accumulate.
template <class T>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the launcher never runs this path below sm_80
#endif
}

#else  // CPU: cpu_mma.h

template <>
struct IsMmaType<pf_shim::bfloat16> : std::true_type {};
template <>
struct IsMmaType<pf_shim::float16> : std::true_type {};

template <>
inline uint32_t pack_floats<pf_shim::bfloat16>(float lo, float hi) {
  return pack_u16(pf_shim::float_to_bf16(lo), pf_shim::float_to_bf16(hi));
}

template <>
inline uint32_t pack_floats<pf_shim::float16>(float lo, float hi) {
  return pack_u16(pf_shim::float_to_fp16(lo), pf_shim::float_to_fp16(hi));
}

template <class T>
inline void mma_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  pf_shim::mma_m16n8k16<T>(acc, a, b0, b1);
}

#endif  // __CUDACC__

template <class T, int D_TILE>
struct MmaTile {
  static_assert(IsMmaType<T>::value, "tensor cores take fp16/bf16");
  static constexpr bool kSimt = false;
  // The warp's 16 query rows as A fragments, one per 16-wide slice of the head dim, kept in registers.
  struct QFrag {
    uint32_t a[D_TILE / 16][4];
  };

  // A fragment: reg0 (row g, cols 2t..2t+1), reg1 (row g+8, same cols), reg2/reg3 the same 8 columns further.
  __device__ __forceinline__ static void load_q(QFrag& q, const T* sQ, int ld, const FragPos& f) {
    const T* r0 = sQ + (f.warp * 16 + f.g) * ld + 2 * f.t;
    const T* r1 = r0 + 8 * ld;
    PF_UNROLL
    for (int kk = 0; kk < D_TILE / 16; ++kk) {
      q.a[kk][0] = ld_u32(r0 + kk * 16);
      q.a[kk][1] = ld_u32(r1 + kk * 16);
      q.a[kk][2] = ld_u32(r0 + kk * 16 + 8);
      q.a[kk][3] = ld_u32(r1 + kk * 16 + 8);
    }
  }

  // B fragment of K^T for key slice n: reg0 = K[n*8+g][2t..2t+1], reg1 = K[n*8+g][2t+8..2t+9] (k = head dim).
  __device__ __forceinline__ static void qk(float (&s)[kBlockN / 8][4], const QFrag& q, const T*, const T* sK,
                                            int ld, int dqk, const FragPos& f) {
    PF_UNROLL
    for (int n = 0; n < kBlockN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    PF_UNROLL
    for (int kk = 0; kk < D_TILE / 16; ++kk) {
      if (kk * 16 >= dqk) break;  // zero padding past the head dim: skip it
      PF_UNROLL
      for (int n = 0; n < kBlockN / 8; ++n) {
        const T* krow = sK + (n * 8 + f.g) * ld + kk * 16 + 2 * f.t;
        mma_16816<T>(s[n], q.a[kk], ld_u32(krow), ld_u32(krow + 8));
      }
    }
  }

  // P comes straight from the S accumulators: slices 2c and 2c+1 of S are the A fragment of key chunk c.
  // B fragment of V for dim slice n: reg0 = (V[16c+2t][n*8+g], V[16c+2t+1][n*8+g]), reg1 = keys 8 further.
  __device__ __forceinline__ static void pv(float (&o)[D_TILE / 8][4], const float (&p)[kBlockN / 8][4], const T* sV,
                                            int ld, float*, int dv, const FragPos& f) {
    const uint16_t* v16 = reinterpret_cast<const uint16_t*>(sV);
    PF_UNROLL
    for (int c = 0; c < kBlockN / 16; ++c) {
      const uint32_t a[4] = {pack_floats<T>(p[2 * c][0], p[2 * c][1]), pack_floats<T>(p[2 * c][2], p[2 * c][3]),
                             pack_floats<T>(p[2 * c + 1][0], p[2 * c + 1][1]),
                             pack_floats<T>(p[2 * c + 1][2], p[2 * c + 1][3])};
      const uint16_t* vrow = v16 + (c * 16 + 2 * f.t) * ld + f.g;
      PF_UNROLL
      for (int n = 0; n < D_TILE / 8; ++n) {
        if (n * 8 >= dv) break;
        const uint16_t* vp = vrow + n * 8;
        mma_16816<T>(o[n], a, pack_u16(vp[0], vp[ld]), pack_u16(vp[8 * ld], vp[9 * ld]));
      }
    }
  }
};

}  // namespace pf
