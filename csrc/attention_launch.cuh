// Host-side launch of the attention kernels on the GPU (tensor-core tiles), torch-free: ops.cu fills the
// parameters from tensors and calls launch_attention. Returns the CUDA error of the launches (cudaSuccess if none).
#pragma once

#include <cuda_runtime.h>

#include "attention_combine.cuh"
#include "attention_fwd.cuh"

namespace pf {

template <class T, int D_TILE>
cudaError_t launch_forward(const AttentionParams& p, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<T, D_TILE, MmaTile<T, D_TILE>>;
  const std::size_t smem = forward_smem_bytes<T>(D_TILE, false);
  // Above 48 KiB dynamic shared memory must be asked for; it is a per-function setting, cheap to repeat.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<forward_grid(p), kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  attention_combine_kernel<T><<<combine_grid(p), kCombineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// T is __half or __nv_bfloat16; the head dims were checked against kMaxHeadDim by the caller.
template <class T>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream) {
  switch (head_dim_tile(p.dqk, p.dv)) {
    case 32:
      return launch_forward<T, 32>(p, stream);
    case 64:
      return launch_forward<T, 64>(p, stream);
    case 128:
      return launch_forward<T, 128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace pf
