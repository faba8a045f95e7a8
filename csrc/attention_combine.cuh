// The reduction pass of split-KV attention: merges the num_splits partial results of every query row.
//
// Split s left O_s (normalised over its keys) and lse_s (log2 units; -inf when it saw no key). The row's result is
// sum_s w_s O_s with w_s = exp2(lse_s - M) / sum_s exp2(lse_s - M), M = max_s lse_s; its lse is M + log2(sum).
// A row no split saw a key of gets zeros and lse = -inf, as the op contract says.
#pragma once

#include <cmath>

#include "attention_params.cuh"

namespace pf {

// One block of kCombineThreads per query row (b, head, query); threads stride over the value dim.
template <class T>
__global__ void __launch_bounds__(kCombineThreads) attention_combine_kernel(AttentionParams p) {
  const int row = blockIdx.x;  // (b * hq + head) * nq + query, the lse layout
  const int query = row % p.nq;
  const int head = (row / p.nq) % p.hq;
  const int b = row / (p.nq * p.hq);
  const int64_t split_stride = static_cast<int64_t>(p.batch) * p.hq * p.nq;

  // Every thread reads the few split lse values itself: cheaper than sharing them through shared memory.
  float max_lse = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) max_lse = fmaxf(max_lse, p.part_lse[s * split_stride + row]);
  float total = 0.f;
  if (max_lse != -INFINITY)
    for (int s = 0; s < p.num_splits; ++s) total += exp2f(p.part_lse[s * split_stride + row] - max_lse);
  const float inv_total = total > 0.f ? 1.f / total : 0.f;

  T* out = static_cast<T*>(p.out) + b * p.o_sb + query * p.o_sn + head * p.o_sh;
  for (int d = threadIdx.x; d < p.dv; d += kCombineThreads) {
    float acc = 0.f;
    if (total > 0.f)
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = exp2f(p.part_lse[s * split_stride + row] - max_lse);
        acc += w * p.part_out[(s * split_stride + row) * p.dv + d];
      }
    out[d] = Elem<T>::from_float(acc * inv_total);
  }
  if (threadIdx.x == 0) p.lse[row] = total > 0.f ? (max_lse + log2f(total)) * 0.69314718055994531f : -INFINITY;
}

}  // namespace pf
