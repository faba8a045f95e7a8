// The only file that knows about torch: the op perceiver_fast_cuda::attention_fwd through PyTorch's stable ABI
// (-DTORCH_STABLE_ONLY), so one binary loads under several torch and Python versions.
//
// The op writes into tensors the caller allocated (out, lse and the split-KV workspace) and launches on the stream
// the caller passes: allocation, the number of splits, the device guard and the stream all live in Python
// (perceiver_fast/kernels/cuda.py), which keeps this library free of libtorch_cuda symbols, so it also loads (and
// registers its schema) under a CPU-only torch.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "attention_launch.cuh"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

void check_qkv(const Tensor& t, const char* name, ScalarType dtype) {
  STD_TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.dim() == 4, name, " must be [batch, seq, heads, head_dim]");
  STD_TORCH_CHECK(t.scalar_type() == dtype, name, " must have the dtype of q");
  STD_TORCH_CHECK(t.stride(3) == 1, name, " must be contiguous in its last dim");
}

bool row_aligned(const Tensor& t) {
  // 16-byte copies need every (batch, seq, head) row start 16-byte aligned and whole 8-element chunks.
  const auto base = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  return base % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
}

void attention_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_start, Tensor kv_len, Tensor out, Tensor lse,
                   Tensor part_out, Tensor part_lse, bool causal, double scale, int64_t num_splits, int64_t stream) {
  const ScalarType dtype = q.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
                  "the CUDA kernels take float16 or bfloat16 (tensor cores)");
  check_qkv(q, "q", dtype);
  check_qkv(k, "k", dtype);
  check_qkv(v, "v", dtype);
  check_qkv(out, "out", dtype);
  STD_TORCH_CHECK(kv_start.scalar_type() == ScalarType::Int && kv_len.scalar_type() == ScalarType::Int,
                  "kv_start and kv_len must be int32");
  STD_TORCH_CHECK(lse.scalar_type() == ScalarType::Float && lse.is_contiguous(), "lse must be contiguous float32");
  STD_TORCH_CHECK(num_splits >= 1, "num_splits must be >= 1");
  if (num_splits > 1)
    STD_TORCH_CHECK(part_out.is_contiguous() && part_lse.is_contiguous() &&
                        part_out.numel() == num_splits * out.numel() && part_lse.numel() == num_splits * lse.numel(),
                    "the split-KV workspace must be contiguous [splits, B, Hq, Nq, Dv] and [splits, B, Hq, Nq]");

  pf::AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = static_cast<float*>(lse.data_ptr());
  p.part_out = num_splits > 1 ? static_cast<float*>(part_out.data_ptr()) : nullptr;
  p.part_lse = num_splits > 1 ? static_cast<float*>(part_lse.data_ptr()) : nullptr;
  p.kv_start = static_cast<const int*>(kv_start.data_ptr());
  p.kv_len = static_cast<const int*>(kv_len.data_ptr());
  p.q_sb = q.stride(0), p.q_sn = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_sn = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_sn = v.stride(1), p.v_sh = v.stride(2);
  p.o_sb = out.stride(0), p.o_sn = out.stride(1), p.o_sh = out.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.nq = static_cast<int>(q.size(1));
  p.hq = static_cast<int>(q.size(2));
  p.dqk = static_cast<int>(q.size(3));
  p.nk = static_cast<int>(k.size(1));
  p.hkv = static_cast<int>(k.size(2));
  p.dv = static_cast<int>(v.size(3));
  STD_TORCH_CHECK(p.hkv > 0 && p.hq % p.hkv == 0, "q heads must be a multiple of k/v heads");
  STD_TORCH_CHECK(pf::head_dim_tile(p.dqk, p.dv) != 0, "head dims above ", pf::kMaxHeadDim, " are not supported");
  STD_TORCH_CHECK(kv_start.numel() == p.batch && kv_len.numel() == p.batch, "kv_start/kv_len must be [batch]");
  STD_TORCH_CHECK(static_cast<int64_t>(p.batch) * p.hkv <= pf::kMaxGridY && num_splits <= pf::kMaxGridY,
                  "batch x kv heads and num_splits must be at most ", pf::kMaxGridY, " (CUDA grid limit)");
  p.group = p.hq / p.hkv;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal ? 1 : 0;
  p.num_splits = static_cast<int>(num_splits);
  p.vec_ok = row_aligned(q) && row_aligned(k) && row_aligned(v);

  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const cudaError_t err = dtype == ScalarType::Half ? pf::launch_attention<__half>(p, cuda_stream)
                                                    : pf::launch_attention<__nv_bfloat16>(p, cuda_stream);
  STD_TORCH_CHECK(err == cudaSuccess, "perceiver_fast attention kernel launch failed: ", cudaGetErrorString(err));
}

// Whether this library holds code the given GPU can run (it was built for the TORCH_CUDA_ARCH_LIST of its build):
// lets Python fall back instead of failing at launch. False, not an error, when there is no such device or driver.
bool has_kernel_image(int64_t device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(static_cast<int>(device)) != cudaSuccess) {
    cudaGetLastError();  // reset the error state so a later, unrelated check does not report this one
    return false;
  }
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, pf::attention_combine_kernel<__half>);
  cudaSetDevice(previous);
  cudaGetLastError();
  return err == cudaSuccess;
}

}  // namespace

STABLE_TORCH_LIBRARY(perceiver_fast_cuda, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_start, Tensor kv_len, Tensor(a!) out, "
      "Tensor(b!) lse, Tensor(c!) part_out, Tensor(d!) part_lse, bool causal, float scale, int num_splits, "
      "int stream) -> ()");
  m.def("has_kernel_image(int device) -> bool");
}

STABLE_TORCH_LIBRARY_IMPL(perceiver_fast_cuda, CUDA, m) { m.impl("attention_fwd", TORCH_BOX(&attention_fwd)); }

// No tensor arguments to dispatch on: registered for every backend.
STABLE_TORCH_LIBRARY_IMPL(perceiver_fast_cuda, CompositeExplicitAutograd, m) {
  m.impl("has_kernel_image", TORCH_BOX(&has_kernel_image));
}
