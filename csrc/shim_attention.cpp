// CPU entry points for tests/kernels/test_cuda_shim.py: run the forward kernels (and the split-KV reduction)
// through cpu_shim.h with the same launch geometry as the GPU launcher: the 64-row kernel with the SIMT tile on fp32
// arrays or the tensor-core tile on bf16 arrays, and the cp.async/ldmatrix kernel (attention_flash.cuh) on bf16 or
// fp16 arrays, with the sm_80 instructions emulated (cpu_mma.h). Also deliberately broken configurations of the
// latter, each a mistake the tests must catch. For tests/kernels/test_cuda_decode_shim.py: the fused decode step
// (attention_decode.cuh) on bf16, fp16 or fp32 arrays, and broken variants of it. Built with g++ -std=c++20 into a
// shared library, called through ctypes.
#include <cstdio>
#include <string>

#include "attention_combine.cuh"
#include "attention_decode.cuh"
#include "attention_flash.cuh"

namespace {

using pf_shim::bfloat16;
using pf_shim::float16;

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

template <class Cfg>
void run_flash(const pf::AttentionParams& p) {
  using T = typename Cfg::Elem;
  pf_shim::launch(pf::flash_grid(p), dim3(Cfg::kThreads), pf::flash_smem_bytes<T>(Cfg::kHeadDim, Cfg::kStages),
                  pf::attention_fwd_flash_kernel<Cfg>, p);
  if (p.num_splits > 1)
    pf_shim::launch(pf::combine_grid(p), dim3(pf::kCombineThreads), 0, pf::attention_combine_kernel<T>, p);
}

// --- broken configurations of the fast kernel (head dim 64), one mistake each ---

// The tiles unswizzled, consistently on both sides: right answers, but every ldmatrix phase reads 8 rows of one
// bank group (an 8-way conflict), which the emulation counts.
template <class T, int S>
struct NoSwizzle : pf::FlashConfig<T, 64, S> {
  using Base = pf::FlashConfig<T, 64, S>;
  static int offset(int row, int chunk) { return row * 64 + chunk * 8; }
  static void load_q(uint32_t (&a)[4], const T* sQ, int warp_row, int kk, int lane) {
    pf::ldmatrix_x4(a, sQ + offset(warp_row + (lane & 15), 2 * kk + (lane >> 4)));
  }
  static void load_k(uint32_t (&b)[4], const T* sK, int n, int kk, int lane) {
    pf::ldmatrix_x4(b, sK + offset(n * 8 + ((lane >> 4) << 3) + (lane & 7), 2 * kk + ((lane >> 3) & 1)));
  }
  static void load_v(uint32_t (&b)[4], const T* sV, int c, int n, int lane) {
    pf::ldmatrix_x4_trans(b, sV + offset(c * 16 + (((lane >> 3) & 1) << 3) + (lane & 7), n + (lane >> 4)));
  }
};

// The V reader forgets the XOR the copies were written with.
template <class T, int S>
struct VReadUnswizzled : pf::FlashConfig<T, 64, S> {
  static void load_v(uint32_t (&b)[4], const T* sV, int c, int n, int lane) {
    pf::ldmatrix_x4_trans(b, sV + (c * 16 + (((lane >> 3) & 1) << 3) + (lane & 7)) * 64 + (n + (lane >> 4)) * 8);
  }
};

// One group too many left pending at the wait: with kStages - 1 groups in flight at the top of an iteration this
// is the same as no wait at all, so the tile being read (and Q) may not have landed.
template <class T, int S>
struct WaitOneShort : pf::FlashConfig<T, 64, S> {
  static constexpr int kPendingAtWait = S - 1;
};

// P's A fragment with its middle registers swapped (rows g+8 and keys 8-15 exchanged).
template <class T, int S>
struct PFragmentSwapped : pf::FlashConfig<T, 64, S> {
  static void p_fragment(uint32_t (&a)[4], const float (&s)[pf::kBlockN / 8][4], int c) {
    pf::FlashConfig<T, 64, S>::p_fragment(a, s, c);
    const uint32_t keep = a[1];
    a[1] = a[2];
    a[2] = keep;
  }
};

// V read with a plain ldmatrix, as if it were K: the B fragment holds rows where it needs columns.
template <class T, int S>
struct VNotTransposed : pf::FlashConfig<T, 64, S> {
  static void load_v(uint32_t (&b)[4], const T* sV, int c, int n, int lane) {
    pf::ldmatrix_x4(b, sV + pf::FlashConfig<T, 64, S>::offset(c * 16 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                                              n + (lane >> 4)));
  }
};

enum Variant { kCorrect = 0, kNoSwizzle, kVReadUnswizzled, kWaitOneShort, kPFragmentSwapped, kVNotTransposed };

template <class T>
int dispatch_flash(const pf::AttentionParams& p, int stages, int variant) {
  const int head_dim = pf::flash_head_dim(p.dqk, p.dv, p.vec_ok);
  if (head_dim == 0 || stages < 2 || stages > 3) return 1;
  if (variant != kCorrect) {
    if (head_dim != 64 || stages != 2) return 1;
    switch (variant) {
      case kNoSwizzle:
        run_flash<NoSwizzle<T, 2>>(p);
        return 0;
      case kVReadUnswizzled:
        run_flash<VReadUnswizzled<T, 2>>(p);
        return 0;
      case kWaitOneShort:
        run_flash<WaitOneShort<T, 2>>(p);
        return 0;
      case kPFragmentSwapped:
        run_flash<PFragmentSwapped<T, 2>>(p);
        return 0;
      case kVNotTransposed:
        run_flash<VNotTransposed<T, 2>>(p);
        return 0;
      default:
        return 1;
    }
  }
  if (head_dim == 64)
    stages == 2 ? run_flash<pf::FlashConfig<T, 64, 2>>(p) : run_flash<pf::FlashConfig<T, 64, 3>>(p);
  else
    stages == 2 ? run_flash<pf::FlashConfig<T, 128, 2>>(p) : run_flash<pf::FlashConfig<T, 128, 3>>(p);
  return 0;
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

// 0 on success, 1 for what the entry does not take, 2 when the emulation recorded a fault (pf_shim_take_fault).
int finish(int status) {
  if (status != 0) return status;
  return pf_shim::faulted.load() ? 2 : 0;
}

}  // namespace

#define PF_SHIM_ARGS                                                                                             \
  const void *q, const void *k, const void *v, void *out, float *lse, float *part_out, float *part_lse,        \
      const int *kv_start, const int *kv_len, const int64_t *strides, const int *dims, float scale, int causal, \
      int num_splits, int vec_ok
#define PF_SHIM_PARAMS \
  make_params(q, k, v, out, lse, part_out, part_lse, kv_start, kv_len, strides, dims, scale, causal, num_splits, vec_ok)

extern "C" int pf_shim_attention_f32_simt(PF_SHIM_ARGS) {
  return finish(dispatch<float, pf::SimtTile>(PF_SHIM_PARAMS));
}

extern "C" int pf_shim_attention_bf16_mma(PF_SHIM_ARGS) {
  return finish(dispatch<bfloat16, pf::MmaTile>(PF_SHIM_PARAMS));
}

// The fast kernel: dtype 0 = bf16, 1 = fp16; stages 2 or 3; variant 0 = the real configuration, else a broken one
// (enum Variant; bf16/fp16, head dim 64, 2 stages only). Takes only what the GPU launcher would send it
// (pf::flash_head_dim != 0), else returns 1.
extern "C" int pf_shim_attention_flash(PF_SHIM_ARGS, int dtype, int stages, int variant) {
  const pf::AttentionParams p = PF_SHIM_PARAMS;
  const int status =
      dtype == 0 ? dispatch_flash<bfloat16>(p, stages, variant) : dispatch_flash<float16>(p, stages, variant);
  return finish(status);
}

// The fault the emulation recorded since the last call (cleared), as text; empty if none.
extern "C" int pf_shim_take_fault(char* buffer, int size) {
  const std::string message = pf_shim::take_fault();
  std::snprintf(buffer, static_cast<std::size_t>(size), "%s", message.c_str());
  return static_cast<int>(message.size());
}

// Matrices read by the emulated ldmatrix and their bank conflicts since the last call (cleared).
extern "C" void pf_shim_take_ldmatrix_stats(long* matrices, long* conflicts) {
  *matrices = pf_shim::ldmatrix_matrices.exchange(0);
  *conflicts = pf_shim::ldmatrix_conflicts.exchange(0);
}

// What the GPU launcher picks for the fast kernel: whether it runs (its head-dim tile, 0: the 64-row kernel runs),
// the pipeline depth and the dynamic shared memory of a block.
extern "C" int pf_shim_flash_head_dim(int dqk, int dv, int vec_ok) { return pf::flash_head_dim(dqk, dv, vec_ok); }
extern "C" int pf_shim_flash_stages(int head_dim) { return pf::flash_stages(head_dim); }
extern "C" long pf_shim_flash_smem_bytes(int head_dim, int stages) {
  return static_cast<long>(pf::flash_smem_bytes<bfloat16>(head_dim, stages));
}

// --- the fused decode step (attention_decode.cuh) ---

namespace {

template <class T, int D_TILE, int GROUP, class Steps>
void run_decode(const pf::DecodeParams& p) {
  pf_shim::launch(pf::decode_grid(p), dim3(pf::kDecodeThreads), pf::decode_smem_bytes<T>(D_TILE, GROUP),
                  pf::attention_decode_kernel<T, D_TILE, GROUP, Steps>, p);
  if (p.attn.num_splits > 1)
    pf_shim::launch(pf::combine_grid(p.attn), dim3(pf::kCombineThreads), 0, pf::attention_combine_kernel<T>, p.attn);
}

template <class T, int D_TILE, class Steps>
int decode_group(const pf::DecodeParams& p) {
  switch (pf::decode_group_tile(p.attn.group)) {
    case 1:
      run_decode<T, D_TILE, 1, Steps>(p);
      return 0;
    case 2:
      run_decode<T, D_TILE, 2, Steps>(p);
      return 0;
    case 4:
      run_decode<T, D_TILE, 4, Steps>(p);
      return 0;
    case 8:
      run_decode<T, D_TILE, 8, Steps>(p);
      return 0;
    default:
      return 1;
  }
}

template <class T, class Steps>
int decode_tile(const pf::DecodeParams& p) {
  switch (pf::head_dim_tile(p.attn.dqk, p.attn.dv)) {
    case 32:
      return decode_group<T, 32, Steps>(p);
    case 64:
      return decode_group<T, 64, Steps>(p);
    case 128:
      return decode_group<T, 128, Steps>(p);
    default:
      return 1;
  }
}

// --- broken decode steps, one mistake each ---

// The pair rotated by -angle: the partner's sign on the wrong channel.
struct RotarySignSwapped : pf::DecodeSteps {
  static void rotate(float x0, float x1, const float* cos, const float* sin, float& y0, float& y1) {
    y0 = x0 * cos[0] + x1 * sin[0];
    y1 = x1 * cos[1] - x0 * sin[1];
  }
};

// The key and value at position[b] read back from the cache, as if the store had already happened: it has not
// when the storing block runs later (or elsewhere, on a GPU).
struct ReadsCacheAtPosition : pf::DecodeSteps {
  static constexpr bool kOwnNewKey = false;
};

// Half-warps' sums and accumulators added as they are, each still relative to its own running max.
struct MergeWithoutRescale : pf::DecodeSteps {
  static float merge_weight(float, float) { return 1.f; }
};

// A split's last key taken as an inclusive end, then used as an exclusive one: each split drops its last key.
struct SplitEndsOneEarly : pf::DecodeSteps {
  static pf::KeySpan split_keys(int start, int len, int num_splits, int split) {
    pf::KeySpan s = pf::DecodeSteps::split_keys(start, len, num_splits, split);
    s.hi = pf::imax(s.lo, s.hi - 1);
    return s;
  }
};

enum DecodeVariant { kDecodeCorrect = 0, kRotarySignSwapped, kReadsCacheAtPosition, kMergeWithoutRescale,
                     kSplitEndsOneEarly };

template <class T, class Steps>
int run_broken(const pf::DecodeParams& p) {
  run_decode<T, 64, 2, Steps>(p);
  return 0;
}

template <class T>
int dispatch_decode(const pf::DecodeParams& p, int variant) {
  if (variant == kDecodeCorrect) return decode_tile<T, pf::DecodeSteps>(p);
  // The broken steps are compiled for one configuration only (head-dim tile 64, 2 q heads per kv head): the tests
  // of them use it, and every instantiation costs the shim's build seconds.
  if (pf::head_dim_tile(p.attn.dqk, p.attn.dv) != 64 || pf::decode_group_tile(p.attn.group) != 2) return 1;
  switch (variant) {
    case kRotarySignSwapped:
      return run_broken<T, RotarySignSwapped>(p);
    case kReadsCacheAtPosition:
      return run_broken<T, ReadsCacheAtPosition>(p);
    case kMergeWithoutRescale:
      return run_broken<T, MergeWithoutRescale>(p);
    case kSplitEndsOneEarly:
      return run_broken<T, SplitEndsOneEarly>(p);
    default:
      return 1;
  }
}

}  // namespace

// One decoding step: q [B, 1, Hq, Dqk], k_new [B, 1, Hkv, Dqk], v_new [B, 1, Hkv, Dv], caches [B, C, Hkv, D], out
// [B, 1, Hq, Dv]; strides: (batch, seq, head) triples in elements for q, k_new, v_new, k_cache, v_cache, out, then
// the batch strides of position, kv_start, kv_len;
// dims: B, C, Hq, Hkv, Dqk, Dv, rotary_dim. dtype 0 = bf16, 1 = fp16, 2 = fp32; variant 0 = the real kernel, else
// a broken one (enum DecodeVariant; bf16, head-dim tile 64, 2 q heads per kv head only). Takes what ops.cu takes
// (head dims multiples of 8 up to 128, at most 8 q heads per kv head, an even rotary_dim up to Dqk), else returns 1.
extern "C" int pf_shim_decode(const void* q, const void* k_new, const void* v_new, void* k_cache, void* v_cache,
                              const int* position, const float* cos, const float* sin, const int* kv_start,
                              const int* kv_len, void* out, float* lse, float* part_out, float* part_lse,
                              const int64_t* strides, const int* dims, float scale, int num_splits, int vec_ok,
                              int dtype, int variant) {
  const int batch = dims[0], capacity = dims[1], hq = dims[2], hkv = dims[3], dqk = dims[4], dv = dims[5];
  const int rotary_dim = dims[6];
  if (hkv < 1 || hq % hkv != 0 || hq / hkv > pf::kMaxDecodeGroup || dqk % 8 != 0 || dv % 8 != 0 || dqk < 8 ||
      dv < 8 || dqk > pf::kMaxHeadDim || dv > pf::kMaxHeadDim || rotary_dim % 2 != 0 || rotary_dim < 0 ||
      rotary_dim > dqk || capacity < 1 || num_splits < 1 || (variant != kDecodeCorrect && dtype != 0))
    return 1;
  pf::DecodeParams p{};
  pf::AttentionParams& a = p.attn;
  a.q = q;
  a.out = out;
  a.lse = lse;
  a.part_out = part_out;
  a.part_lse = part_lse;
  a.kv_start = kv_start;
  a.kv_len = kv_len;
  a.q_sb = strides[0], a.q_sn = strides[1], a.q_sh = strides[2];
  p.kn_sb = strides[3], p.kn_sh = strides[5];
  p.vn_sb = strides[6], p.vn_sh = strides[8];
  a.k_sb = strides[9], a.k_sn = strides[10], a.k_sh = strides[11];
  a.v_sb = strides[12], a.v_sn = strides[13], a.v_sh = strides[14];
  a.o_sb = strides[15], a.o_sn = strides[16], a.o_sh = strides[17];
  p.position_stride = strides[18], p.kv_start_stride = strides[19], p.kv_len_stride = strides[20];
  a.batch = batch, a.nq = 1, a.nk = capacity, a.hq = hq, a.hkv = hkv, a.dqk = dqk, a.dv = dv;
  a.group = hq / hkv;
  a.scale_log2 = scale * 1.4426950408889634f;
  a.num_splits = num_splits;
  a.vec_ok = vec_ok;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.k_new = k_new;
  p.v_new = v_new;
  p.position = position;
  p.cos = cos;
  p.sin = sin;
  p.rotary_dim = rotary_dim;
  switch (dtype) {
    case 0:
      return finish(dispatch_decode<bfloat16>(p, variant));
    case 1:
      return finish(dispatch_decode<float16>(p, variant));
    case 2:
      return finish(dispatch_decode<float>(p, variant));
    default:
      return 1;
  }
}

// What the GPU launcher compiles for: the group tile (0: declined) and the dynamic shared memory of a block.
extern "C" int pf_shim_decode_group_tile(int group) { return pf::decode_group_tile(group); }
extern "C" long pf_shim_decode_smem_bytes(int d_tile, int group_tile) {
  return static_cast<long>(pf::decode_smem_bytes<bfloat16>(d_tile, group_tile));
}

// --- the emulated ldmatrix on its own: one warp, 32 shared rows of 8 16-bit values ---

namespace {

template <int N, bool TRANS>
void ldmatrix_probe(const uint16_t* rows, const int* row_of_lane, uint32_t* out) {
  uint16_t* smem = static_cast<uint16_t*>(pf::dynamic_smem());
  const int lane = static_cast<int>(threadIdx.x);
  for (int e = 0; e < 8; ++e) smem[lane * 8 + e] = rows[lane * 8 + e];
  __syncwarp();
  uint32_t r[N];
  pf_shim::ldmatrix<N, TRANS>(r, smem + row_of_lane[lane] * 8);
  for (int m = 0; m < N; ++m) out[lane * 4 + m] = r[m];
}

}  // namespace

// rows: [32][8] values; row_of_lane[lane]: the row whose address the lane supplies; out: [32 lanes][4] registers.
extern "C" int pf_shim_ldmatrix(int num, int trans, const uint16_t* rows, const int* row_of_lane, uint32_t* out) {
  auto go = [&](auto kernel) {
    pf_shim::launch(dim3(1), dim3(32), 32 * 8 * sizeof(uint16_t), kernel, rows, row_of_lane, out);
  };
  switch (num * 2 + (trans ? 1 : 0)) {
    case 2: go(ldmatrix_probe<1, false>); break;
    case 3: go(ldmatrix_probe<1, true>); break;
    case 4: go(ldmatrix_probe<2, false>); break;
    case 5: go(ldmatrix_probe<2, true>); break;
    case 8: go(ldmatrix_probe<4, false>); break;
    case 9: go(ldmatrix_probe<4, true>); break;
    default: return 1;
  }
  return finish(0);
}
