// Host-side launch of the attention kernels on the GPU (tensor-core tiles), torch-free: ops.cu fills the
// parameters from tensors and calls launch_attention. Returns the CUDA error of the launches (cudaSuccess if none).
#pragma once

#include <cuda_runtime.h>

#include "attention_combine.cuh"
#include "attention_flash.cuh"

namespace pf {

// Above 48 KiB dynamic shared memory must be asked for; it is a per-function setting, cheap to repeat.
template <class Kernel>
cudaError_t allow_smem(Kernel kernel, std::size_t smem) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <class T>
cudaError_t launch_combine(const AttentionParams& p, cudaStream_t stream) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  attention_combine_kernel<T><<<combine_grid(p), kCombineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The 64-row tile with plain loads: head dims up to 32, and rows not 16-byte aligned.
template <class T, int D_TILE>
cudaError_t launch_forward(const AttentionParams& p, cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<T, D_TILE, MmaTile<T, D_TILE>>;
  const std::size_t smem = forward_smem_bytes<T>(D_TILE, false);
  const cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<forward_grid(p), kThreads, smem, stream>>>(p);
  return launch_combine<T>(p, stream);
}

// The cp.async/ldmatrix pipeline (attention_flash.cuh) for head-dim tiles 64 and 128.
template <class T, int HEAD_DIM>
cudaError_t launch_flash(const AttentionParams& p, cudaStream_t stream) {
  using Cfg = FlashConfig<T, HEAD_DIM, flash_stages(HEAD_DIM)>;
  auto kernel = attention_fwd_flash_kernel<Cfg>;
  const std::size_t smem = flash_smem_bytes<T>(HEAD_DIM, Cfg::kStages);
  const cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<flash_grid(p), Cfg::kThreads, smem, stream>>>(p);
  return launch_combine<T>(p, stream);
}

// T is __half or __nv_bfloat16; the head dims were checked against kMaxHeadDim by the caller.
template <class T>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream) {
  switch (flash_head_dim(p.dqk, p.dv, p.vec_ok)) {
    case 64:
      return launch_flash<T, 64>(p, stream);
    case 128:
      return launch_flash<T, 128>(p, stream);
    default:
      break;
  }
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
