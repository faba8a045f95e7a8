// The sm_80 data-movement instructions of the fast forward kernel (attention_flash.cuh), per platform: inline PTX
// on the GPU; on the CPU the emulations of cpu_shim.h (cp.async, deferred to its wait) and cpu_mma.h (ldmatrix).
//
// cp.async.cg copies 16 bytes global -> shared without passing through registers (and without allocating in L1:
// a K/V tile is read once per block), so a tile for a later iteration can be in flight while this one is computed.
// Its src-size operand (0..16) reads only that many bytes and zero-fills the rest, which is how rows outside a
// row's key bounds and columns past the head dim become zeros without a load.
#pragma once

#include "platform.cuh"

namespace pf {

#if defined(__CUDACC__)

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// src must be 16-byte aligned whenever src_bytes > 0; with src_bytes == 0 nothing is read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Returns when at most PENDING of this thread's committed groups are still in flight. The copies of other threads
// are visible only after a barrier that follows their own wait.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#else
  __trap();
#endif
}

#else  // CPU

inline void cp_async_16(void* dst, const void* src, int src_bytes) { pf_shim::cp_async_issue(dst, src, src_bytes); }
inline void cp_async_commit() { pf_shim::cp_async_commit_group(); }
template <int PENDING>
inline void cp_async_wait() {
  pf_shim::cp_async_wait_group(PENDING);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { pf_shim::ldmatrix<4, false>(r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { pf_shim::ldmatrix<4, true>(r, row); }

#endif

}  // namespace pf
