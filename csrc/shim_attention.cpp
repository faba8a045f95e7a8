// CPU entry points for tests/kernels/test_cuda_shim.py: run the forward kernel (and the split-KV reduction)
// through cpu_shim.h with the same launch geometry as the GPU launcher, either with the SIMT tile on fp32 arrays
// or with the tensor-core tile on bf16 arrays (mma.sync emulated by cpu_mma.h). Built with g++ -std=c++20 into a
// shared library and called through ctypes.
#include "attention_combine.cuh"
#include "attention_fwd.cuh"

namespace {

template <class T, template <class, int> class Tile, int D_TILE>
void run(const pf::AttentionParams& p) {
  using TileT = Tile<T, D_TILE>;
  pf_shim::launch(pf::forward_grid(p), dim3(pf::kThreads), pf::forward_smem_bytes<T>(D_TILE, TileT::kSimt),
                  pf::attention_fwd_kernel<T, D_TILE, TileT>, p);
  if (p.num_splits > 1)
    pf_shim::launch(pf::combine_grid(p), dim3(pf::kCombineThreads), 0, pf::attention_combine_kernel<T>, p);
}

template <class T, template <class, int> class Tile>
int dispatch(const pf::AttentionParams& p) {
  switch (pf::head_dim_tile(p.dqk, p.dv)) {
    case 32:
      run<T, Tile, 32>(p);
      return 0;
    case 64:
      run<T, Tile, 64>(p);
      return 0;
    case 128:
      run<T, Tile, 128>(p);
      return 0;
    default:
      return 1;  // unsupported head dims
  }
}

// strides: q, k, v, out as (batch, seq, head) triples in elements; dims: B, Nq, Nk, Hq, Hkv, Dqk, Dv.
pf::AttentionParams make_params(const void* q, const void* k, const void* v, void* out, float* lse, float* part_out,
                                float* part_lse, const int* kv_start, const int* kv_len, const int64_t* strides,
                                const int* dims, float scale, int causal, int num_splits, int vec_ok) {
  pf::AttentionParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.part_out = part_out;
  p.part_lse = part_lse;
  p.kv_start = kv_start;
  p.kv_len = kv_len;
  p.q_sb = strides[0], p.q_sn = strides[1], p.q_sh = strides[2];
  p.k_sb = strides[3], p.k_sn = strides[4], p.k_sh = strides[5];
  p.v_sb = strides[6], p.v_sn = strides[7], p.v_sh = strides[8];
  p.o_sb = strides[9], p.o_sn = strides[10], p.o_sh = strides[11];
  p.batch = dims[0], p.nq = dims[1], p.nk = dims[2], p.hq = dims[3], p.hkv = dims[4], p.dqk = dims[5],
  p.dv = dims[6];
  p.group = p.hq / p.hkv;
  p.scale_log2 = scale * 1.4426950408889634f;
  p.causal = causal;
  p.num_splits = num_splits;
  p.vec_ok = vec_ok;
  return p;
}

}  // namespace

#define PF_SHIM_ARGS                                                                                             \
  const void *q, const void *k, const void *v, void *out, float *lse, float *part_out, float *part_lse,        \
      const int *kv_start, const int *kv_len, const int64_t *strides, const int *dims, float scale, int causal, \
      int num_splits, int vec_ok
#define PF_SHIM_PARAMS \
  make_params(q, k, v, out, lse, part_out, part_lse, kv_start, kv_len, strides, dims, scale, causal, num_splits, vec_ok)

// Returns 0 on success, 1 for unsupported head dims.
extern "C" int pf_shim_attention_f32_simt(PF_SHIM_ARGS) { return dispatch<float, pf::SimtTile>(PF_SHIM_PARAMS); }

extern "C" int pf_shim_attention_bf16_mma(PF_SHIM_ARGS) {
  return dispatch<pf_shim::bfloat16, pf::MmaTile>(PF_SHIM_PARAMS);
}
