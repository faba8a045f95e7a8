// A tiny CUDA execution model on the CPU, so the SIMT device code in csrc/*.cuh runs (and is tested) without a GPU.
//
// One std::thread per CUDA thread of a block; the threads walk the grid together, one block at a time, so storage
// shared by "the block" can simply be static storage (only one block is ever live). __syncthreads() is a
// std::barrier over the block, __syncwarp() and the shuffles are barriers over the warp's 32 threads. blockIdx and
// threadIdx are thread-locals. This is enough for the code paths tested here; it is not a general CUDA emulator
// (no atomics, no tensor cores, no inline PTX).
#pragma once
#if defined(__CUDACC__)
#error "cpu_shim.h is for host compilers only"
#endif

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The 16-byte vector type device code uses for wide copies.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline thread_local dim3 blockIdx;
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Only one block is live at a time, so static storage is block-local storage.
#define __shared__ static

namespace pf_shim {

constexpr int kWarpSize = 32;

struct Warp {
  std::barrier<> barrier{kWarpSize};
  alignas(8) unsigned char slots[kWarpSize][8];  // shuffles
  uint32_t fragments[kWarpSize][6];               // emulated mma.sync (cpu_mma.h)
};

struct Block {
  explicit Block(int threads, std::size_t smem_bytes)
      : barrier(threads), warps(threads / kWarpSize), smem(new uint4[(smem_bytes + 15) / 16 + 1]) {}
  std::barrier<> barrier;
  std::vector<Warp> warps;
  std::unique_ptr<uint4[]> smem;  // the launch's dynamic shared memory, 16-byte aligned
};

inline thread_local Block* tl_block = nullptr;

inline int linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// Runs kernel(args...) over the whole grid; returns when every block has finished.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, std::size_t smem_bytes, Kernel kernel, Args... args) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  Block state(threads, smem_bytes);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int tid = 0; tid < threads; ++tid) {
    pool.emplace_back([&, tid] {
      tl_block = &state;
      blockDim = block;
      gridDim = grid;
      threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel(args...);
            // The next block reuses the shared storage: nobody starts it until everybody has left this one.
            state.barrier.arrive_and_wait();
          }
    });
  }
  for (auto& t : pool) t.join();
}

inline Warp& my_warp() { return tl_block->warps[linear_thread() / kWarpSize]; }

template <class T>
T shuffle(T value, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  Warp& warp = my_warp();
  const int lane = linear_thread() % kWarpSize;
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, warp.slots[src_lane % kWarpSize], sizeof(T));
  warp.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return result;
}

}  // namespace pf_shim

inline void __syncthreads() { pf_shim::tl_block->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { pf_shim::my_warp().barrier.arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return pf_shim::shuffle(value, (pf_shim::linear_thread() % pf_shim::kWarpSize) ^ lane_mask);
}

template <class T>
T __shfl_sync(unsigned, T value, int src_lane) {
  return pf_shim::shuffle(value, src_lane);
}

// Dynamic shared memory of the running launch (CUDA: `extern __shared__`).
inline void* pf_shim_dynamic_smem() { return pf_shim::tl_block->smem.get(); }
