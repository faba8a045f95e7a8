// What the device code needs from its compiler: nvcc for the GPU, or a host compiler plus cpu_shim.h for the CPU
// tests. Every other header includes this one and nothing platform-specific.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PF_UNROLL _Pragma("unroll")
#else
#include "cpu_shim.h"
#include "cpu_mma.h"
#define PF_UNROLL
#endif

namespace pf {

constexpr int kWarpSize = 32;

// The launch's dynamic shared memory, 16-byte aligned.
__device__ __forceinline__ void* dynamic_smem() {
#if defined(__CUDACC__)
  extern __shared__ uint4 pf_dynamic_smem[];
  return pf_dynamic_smem;
#else
  return pf_shim_dynamic_smem();
#endif
}

// Storage type <-> fp32. Arithmetic is always fp32; T only says how values are stored.
template <class T>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

#if !defined(__CUDACC__)
template <>
struct Elem<pf_shim::bfloat16> {
  static float to_float(pf_shim::bfloat16 x) { return pf_shim::bf16_to_float(x.bits); }
  static pf_shim::bfloat16 from_float(float x) { return {pf_shim::float_to_bf16(x)}; }
};

template <>
struct Elem<pf_shim::float16> {
  static float to_float(pf_shim::float16 x) { return pf_shim::fp16_to_float(x.bits); }
  static pf_shim::float16 from_float(float x) { return {pf_shim::float_to_fp16(x)}; }
};
#else
template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
#endif

__host__ __device__ __forceinline__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ constexpr int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ constexpr int imax(int a, int b) { return a > b ? a : b; }

}  // namespace pf
