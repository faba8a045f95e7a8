// Host-side launch of the fused decode step (attention_decode.cuh), torch-free like attention_launch.cuh: ops.cu
// fills DecodeParams from tensors and calls launch_decode. Returns the CUDA error of the launches (cudaSuccess if
// none).
#pragma once

#include "attention_decode.cuh"
#include "attention_launch.cuh"

namespace pf {

template <class T, int D_TILE, int GROUP>
cudaError_t launch_decode_kernel(const DecodeParams& p, cudaStream_t stream) {
  // At most 35 KiB (d128, 8 heads): under the 48 KiB a launch gets without opting in.
  static_assert(decode_smem_bytes<T>(D_TILE, GROUP) <= 48 * 1024, "decode shared memory needs an opt-in");
  attention_decode_kernel<T, D_TILE, GROUP>
      <<<decode_grid(p), kDecodeThreads, decode_smem_bytes<T>(D_TILE, GROUP), stream>>>(p);
  return launch_combine<T>(p.attn, stream);
}

template <class T, int D_TILE>
cudaError_t launch_decode_tile(const DecodeParams& p, cudaStream_t stream) {
  switch (decode_group_tile(p.attn.group)) {
    case 1:
      return launch_decode_kernel<T, D_TILE, 1>(p, stream);
    case 2:
      return launch_decode_kernel<T, D_TILE, 2>(p, stream);
    case 4:
      return launch_decode_kernel<T, D_TILE, 4>(p, stream);
    case 8:
      return launch_decode_kernel<T, D_TILE, 8>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// T is __half or __nv_bfloat16; the caller checked the head dims (multiples of 8, at most 128) and the group.
template <class T>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  switch (head_dim_tile(p.attn.dqk, p.attn.dv)) {
    case 32:
      return launch_decode_tile<T, 32>(p, stream);
    case 64:
      return launch_decode_tile<T, 64>(p, stream);
    case 128:
      return launch_decode_tile<T, 128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace pf
