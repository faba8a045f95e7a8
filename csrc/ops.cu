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

#include "attention_decode_launch.cuh"
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

// The fields both ops fill alike: pointers, strides in elements, sizes (from q, the keys k and the values v), the
// scale in base 2 and the split count. The caller checks the sizes and sets causal and vec_ok.
void fill_attention_params(pf::AttentionParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& out, const Tensor& lse, const Tensor& part_out, const Tensor& part_lse,
                           const Tensor& kv_start, const Tensor& kv_len, double scale, int64_t num_splits) {
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
  p.group = p.hkv > 0 ? p.hq / p.hkv : 0;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.num_splits = static_cast<int>(num_splits);
}

void check_shape(const Tensor& t, const char* name, int64_t batch, int64_t seq, int64_t heads, int64_t dim) {
  STD_TORCH_CHECK(t.size(0) == batch && t.size(1) == seq && t.size(2) == heads && t.size(3) == dim, name,
                  " must be [", batch, ", ", seq, ", ", heads, ", ", dim, "], got [", t.size(0), ", ", t.size(1),
                  ", ", t.size(2), ", ", t.size(3), "]");
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
  // The kernels take every size from q, k and v: tensors that disagree would be read or written out of bounds.
  const int64_t batch = q.size(0), nq = q.size(1), hq = q.size(2), dqk = q.size(3);
  const int64_t nk = k.size(1), hkv = k.size(2), dv = v.size(3);
  check_shape(k, "k", batch, nk, hkv, dqk);
  check_shape(v, "v", batch, nk, hkv, dv);
  check_shape(out, "out", batch, nq, hq, dv);
  STD_TORCH_CHECK(kv_start.scalar_type() == ScalarType::Int && kv_len.scalar_type() == ScalarType::Int,
                  "kv_start and kv_len must be int32");
  STD_TORCH_CHECK(kv_start.is_cuda() && kv_len.is_cuda(), "kv_start and kv_len must be CUDA tensors");
  STD_TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == ScalarType::Float && lse.is_contiguous() &&
                      lse.numel() == batch * hq * nq,
                  "lse must be a contiguous CUDA float32 tensor of [batch, q heads, Nq] = [", batch, ", ", hq, ", ",
                  nq, "]");
  STD_TORCH_CHECK(num_splits >= 1, "num_splits must be >= 1");
  if (num_splits > 1)
    STD_TORCH_CHECK(part_out.scalar_type() == ScalarType::Float && part_lse.scalar_type() == ScalarType::Float &&
                        part_out.is_contiguous() && part_lse.is_contiguous() &&
                        part_out.numel() == num_splits * out.numel() && part_lse.numel() == num_splits * lse.numel(),
                    "the split-KV workspace must be contiguous float32 [splits, B, Hq, Nq, Dv] and "
                    "[splits, B, Hq, Nq]");

  pf::AttentionParams p{};
  fill_attention_params(p, q, k, v, out, lse, part_out, part_lse, kv_start, kv_len, scale, num_splits);
  STD_TORCH_CHECK(p.hkv > 0 && p.hq % p.hkv == 0, "q heads must be a multiple of k/v heads");
  STD_TORCH_CHECK(pf::head_dim_tile(p.dqk, p.dv) != 0, "head dims above ", pf::kMaxHeadDim, " are not supported");
  // The kernels read row b's bound at offset b: a view (an expanded value) would hand them other memory.
  STD_TORCH_CHECK(kv_start.numel() == p.batch && kv_len.numel() == p.batch && kv_start.is_contiguous() &&
                      kv_len.is_contiguous(),
                  "kv_start/kv_len must be contiguous [batch]");
  STD_TORCH_CHECK(static_cast<int64_t>(p.batch) * p.hkv <= pf::kMaxGridY && num_splits <= pf::kMaxGridY,
                  "batch x kv heads and num_splits must be at most ", pf::kMaxGridY, " (CUDA grid limit)");
  p.causal = causal ? 1 : 0;
  p.vec_ok = row_aligned(q) && row_aligned(k) && row_aligned(v);

  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const cudaError_t err = dtype == ScalarType::Half ? pf::launch_attention<__half>(p, cuda_stream)
                                                    : pf::launch_attention<__nv_bfloat16>(p, cuda_stream);
  STD_TORCH_CHECK(err == cudaSuccess, "perceiver_fast attention kernel launch failed: ", cudaGetErrorString(err));
}

// One int32 per batch row, any stride (an expanded single value has stride 0).
void check_per_row(const Tensor& t, const char* name, int64_t batch) {
  STD_TORCH_CHECK(t.is_cuda() && t.scalar_type() == ScalarType::Int && t.dim() == 1 && t.size(0) == batch, name,
                  " must be a CUDA int32 tensor of shape [batch] = [", batch, "]");
}

// One decoding step (attention_decode.cuh): rotary on q and k_new with the angles cos/sin [B, R] (R = 0: none),
// k_new/v_new stored into the caches at row position[b] (not stored when outside [0, C)), and attention of q over
// cache keys [kv_start[b], kv_len[b]), in which the key at position[b] is the new one.
void decode_attention_fwd(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor v_cache, Tensor position,
                          Tensor cos, Tensor sin, Tensor kv_start, Tensor kv_len, Tensor out, Tensor lse,
                          Tensor part_out, Tensor part_lse, double scale, int64_t num_splits, int64_t stream) {
  const ScalarType dtype = q.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
                  "the CUDA decode kernel takes float16 or bfloat16");
  check_qkv(q, "q", dtype);
  check_qkv(k_new, "k_new", dtype);
  check_qkv(v_new, "v_new", dtype);
  check_qkv(k_cache, "k_cache", dtype);
  check_qkv(v_cache, "v_cache", dtype);
  check_qkv(out, "out", dtype);
  const int64_t batch = q.size(0), hq = q.size(2), dqk = q.size(3);
  const int64_t capacity = k_cache.size(1), hkv = k_cache.size(2), dv = v_cache.size(3);
  check_shape(q, "q", batch, 1, hq, dqk);
  check_shape(k_new, "k_new", batch, 1, hkv, dqk);
  check_shape(v_new, "v_new", batch, 1, hkv, dv);
  check_shape(k_cache, "k_cache", batch, capacity, hkv, dqk);
  check_shape(v_cache, "v_cache", batch, capacity, hkv, dv);
  check_shape(out, "out", batch, 1, hq, dv);
  STD_TORCH_CHECK(capacity >= 1, "the caches must hold at least one row");
  check_per_row(position, "position", batch);
  check_per_row(kv_start, "kv_start", batch);
  check_per_row(kv_len, "kv_len", batch);
  STD_TORCH_CHECK(hkv > 0 && hq % hkv == 0 && hq / hkv <= pf::kMaxDecodeGroup,
                  "q heads must be a multiple of k/v heads, at most ", pf::kMaxDecodeGroup, " times as many");
  STD_TORCH_CHECK(dqk % 8 == 0 && dv % 8 == 0 && dqk <= pf::kMaxHeadDim && dv <= pf::kMaxHeadDim,
                  "the decode kernel takes head dims that are multiples of 8 up to ", pf::kMaxHeadDim);
  STD_TORCH_CHECK(cos.numel() == sin.numel(), "cos and sin must have the same shape");
  int64_t rotary_dim = 0;
  if (cos.numel() > 0) {
    for (const Tensor* t : {&cos, &sin})
      STD_TORCH_CHECK(t->is_cuda() && t->scalar_type() == ScalarType::Float && t->dim() == 2 &&
                          t->size(0) == batch && t->is_contiguous(),
                      "cos and sin must be contiguous CUDA float32 [batch, rotary_dim]");
    rotary_dim = cos.size(1);
    STD_TORCH_CHECK(sin.size(1) == rotary_dim && rotary_dim % 2 == 0 && rotary_dim <= dqk,
                    "rotary_dim must be even and at most the q/k head dim, got ", rotary_dim);
  }
  STD_TORCH_CHECK(lse.scalar_type() == ScalarType::Float && lse.is_contiguous() && lse.numel() == batch * hq,
                  "lse must be contiguous float32 [batch, q heads, 1]");
  STD_TORCH_CHECK(num_splits >= 1, "num_splits must be >= 1");
  if (num_splits > 1)
    STD_TORCH_CHECK(part_out.scalar_type() == ScalarType::Float && part_lse.scalar_type() == ScalarType::Float &&
                        part_out.is_contiguous() && part_lse.is_contiguous() &&
                        part_out.numel() == num_splits * batch * hq * dv && part_lse.numel() == num_splits * batch * hq,
                    "the split-KV workspace must be contiguous float32 [splits, B, Hq, 1, Dv] and [splits, B, Hq, 1]");
  STD_TORCH_CHECK(batch * hkv <= pf::kMaxGridY && num_splits <= pf::kMaxGridY,
                  "batch x kv heads and num_splits must be at most ", pf::kMaxGridY, " (CUDA grid limit)");

  pf::DecodeParams p{};
  pf::AttentionParams& a = p.attn;
  // The caches are the keys; a.k and a.v are not read (the kernel writes through k_cache/v_cache).
  fill_attention_params(a, q, k_cache, v_cache, out, lse, part_out, part_lse, kv_start, kv_len, scale, num_splits);
  a.causal = 0;  // the single query is the last position: it sees every key of its range
  a.vec_ok = row_aligned(k_cache) && row_aligned(v_cache);  // q, k_new, v_new are read once, element by element
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_new = k_new.data_ptr();
  p.v_new = v_new.data_ptr();
  p.kn_sb = k_new.stride(0), p.kn_sh = k_new.stride(2);
  p.vn_sb = v_new.stride(0), p.vn_sh = v_new.stride(2);
  p.position = static_cast<const int*>(position.data_ptr());
  p.position_stride = position.stride(0), p.kv_start_stride = kv_start.stride(0), p.kv_len_stride = kv_len.stride(0);
  p.cos = rotary_dim > 0 ? static_cast<const float*>(cos.data_ptr()) : nullptr;
  p.sin = rotary_dim > 0 ? static_cast<const float*>(sin.data_ptr()) : nullptr;
  p.rotary_dim = static_cast<int>(rotary_dim);

  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const cudaError_t err = dtype == ScalarType::Half ? pf::launch_decode<__half>(p, cuda_stream)
                                                    : pf::launch_decode<__nv_bfloat16>(p, cuda_stream);
  STD_TORCH_CHECK(err == cudaSuccess, "perceiver_fast decode kernel launch failed: ", cudaGetErrorString(err));
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
  m.def(
      "decode_attention_fwd(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor position, Tensor cos, Tensor sin, Tensor kv_start, Tensor kv_len, Tensor(c!) out, Tensor(d!) lse, "
      "Tensor(e!) part_out, Tensor(f!) part_lse, float scale, int num_splits, int stream) -> ()");
  m.def("has_kernel_image(int device) -> bool");
}

STABLE_TORCH_LIBRARY_IMPL(perceiver_fast_cuda, CUDA, m) {
  m.impl("attention_fwd", TORCH_BOX(&attention_fwd));
  m.impl("decode_attention_fwd", TORCH_BOX(&decode_attention_fwd));
}

// No tensor arguments to dispatch on: registered for every backend.
STABLE_TORCH_LIBRARY_IMPL(perceiver_fast_cuda, CompositeExplicitAutograd, m) {
  m.impl("has_kernel_image", TORCH_BOX(&has_kernel_image));
}
