// A tiny CUDA execution model on the CPU, so the device code in csrc/*.cuh runs (and is tested) without a GPU.
//
// One std::thread per CUDA thread of a block; the threads walk the grid together, one block at a time, so storage
// shared by "the block" can simply be static storage (only one block is ever live). __syncthreads() is a
// std::barrier over the block, __syncwarp() and the shuffles are barriers over the warp's 32 threads. blockIdx and
// threadIdx are thread-locals. This is enough for the code paths tested here; it is not a general CUDA emulator
// (no atomics, no inline PTX: the sm_80 instructions the kernels use are emulated by name, see cpu_mma.h).
//
// cp.async (sm_80 asynchronous global -> shared copies) is emulated adversarially: a copy lands only when the
// issuing thread's cp.async.wait_group retires its group, the latest moment the PTX memory model allows, and until
// then its 16 destination bytes are marked in flight. A read of shared memory through the emulated ldmatrix that
// touches bytes in flight is a fault (see fault() below), and shared memory is filled with 0xFF (NaN in every float
// format) before each block. So a missing wait or a wait that leaves one group too many pending (a wrong pipeline
// depth) is always seen, as a fault or as NaN/stale data. A missing barrier between other threads' waits and the
// read is seen only when the threads happen to run in that order: the emulation does not track happens-before.
#pragma once
#if defined(__CUDACC__)
#error "cpu_shim.h is for host compilers only"
#endif

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The vector types device code uses for wide copies.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct alignas(8) uint2 {
  unsigned x, y;
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
  const unsigned char* rows[kWarpSize];           // emulated ldmatrix: the row address each lane supplies
};

// The first misuse the emulation detects (an address outside shared memory, a misaligned copy, a read of bytes a
// cp.async has not delivered yet). Kernels keep running after a fault (a CPU thread cannot unwind a CUDA block);
// the entry points report it and the tests fail on it.
inline std::mutex fault_mutex;
inline std::string fault_message;
inline std::atomic<bool> faulted{false};

inline void fault(const std::string& message) {
  std::lock_guard<std::mutex> lock(fault_mutex);
  if (!faulted.exchange(true)) fault_message = message;
}

// Returns (and clears) the recorded fault, empty if none.
inline std::string take_fault() {
  std::lock_guard<std::mutex> lock(fault_mutex);
  std::string message = faulted.exchange(false) ? fault_message : std::string();
  fault_message.clear();
  return message;
}

struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes;  // the rest of the 16 bytes is zero-filled
};

// The emulated cp.async state of one CUDA thread: copies issued since the last commit, and committed groups in order.
struct AsyncCopies {
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> groups;
};
inline thread_local AsyncCopies tl_copies;

struct Block;

// Runs once per block boundary, while every thread waits: fresh shared memory for the next block.
struct NextBlock {
  Block* block;
  void operator()() noexcept;
};

struct Block {
  explicit Block(int threads, std::size_t smem_bytes_)
      : barrier(threads),
        block_end(threads, NextBlock{this}),
        warps(threads / kWarpSize),
        chunks((smem_bytes_ + 15) / 16 + 1),
        smem(new uint4[chunks]),
        in_flight(new std::atomic<uint8_t>[chunks]),
        smem_bytes(smem_bytes_) {
    reset();
  }
  // Uninitialised shared memory reads as NaN, so a read before its copy landed cannot pass for a zero.
  void reset() {
    std::memset(static_cast<void*>(smem.get()), 0xff, chunks * sizeof(uint4));
    for (std::size_t i = 0; i < chunks; ++i) in_flight[i].store(0, std::memory_order_relaxed);
  }
  unsigned char* base() const { return reinterpret_cast<unsigned char*>(smem.get()); }
  // Index of the 16-byte chunk at p, or -1 when [p, p + bytes) is not inside the launch's shared memory.
  long chunk_of(const void* p, std::size_t bytes) const {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < base() || c + bytes > base() + smem_bytes) return -1;
    return static_cast<long>((c - base()) / 16);
  }
  std::barrier<> barrier;
  std::barrier<NextBlock> block_end;
  std::vector<Warp> warps;
  std::size_t chunks;
  std::unique_ptr<uint4[]> smem;  // the launch's dynamic shared memory, 16-byte aligned
  std::unique_ptr<std::atomic<uint8_t>[]> in_flight;  // per 16-byte chunk: a cp.async into it has not landed
  std::size_t smem_bytes;
};

inline void NextBlock::operator()() noexcept { block->reset(); }

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
            // Copies still pending when a block exits would land in the next block's shared memory on the CPU;
            // on the GPU they die with the block.
            tl_copies = AsyncCopies{};
            // The next block reuses the shared storage: nobody starts it until everybody has left this one.
            state.block_end.arrive_and_wait();
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

namespace pf_shim {

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: queued, not performed (see the top of this file).
inline void cp_async_issue(void* dst, const void* src, int src_bytes) {
  Block& block = *tl_block;
  const long chunk = block.chunk_of(dst, 16);
  if (chunk < 0 || reinterpret_cast<std::uintptr_t>(dst) % 16 != 0) {
    fault("cp.async destination outside shared memory or not 16-byte aligned");
    return;
  }
  if (src_bytes < 0 || src_bytes > 16 || (src_bytes > 0 && reinterpret_cast<std::uintptr_t>(src) % 16 != 0)) {
    fault("cp.async source not 16-byte aligned or src-size outside [0, 16]");
    return;
  }
  if (block.in_flight[chunk].fetch_add(1) != 0) fault("two cp.async in flight to the same 16 bytes");
  tl_copies.open.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_bytes});
}

inline void cp_async_commit_group() {
  tl_copies.groups.push_back(std::move(tl_copies.open));
  tl_copies.open.clear();
}

// cp.async.wait_group n: the thread's committed groups complete, oldest first, until at most n are pending.
inline void cp_async_wait_group(int pending) {
  Block& block = *tl_block;
  while (static_cast<int>(tl_copies.groups.size()) > pending) {
    for (const AsyncCopy& c : tl_copies.groups.front()) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(c.dst + c.src_bytes, 0, 16 - c.src_bytes);
      block.in_flight[block.chunk_of(c.dst, 16)].fetch_sub(1);
    }
    tl_copies.groups.pop_front();
  }
}

// A read of `bytes` of shared memory at p by a warp-collective instruction: inside, and delivered.
inline void check_shared_read(const void* p, std::size_t bytes, const char* what) {
  Block& block = *tl_block;
  const long chunk = block.chunk_of(p, bytes);
  if (chunk < 0) {
    fault(std::string(what) + " address outside shared memory");
    return;
  }
  for (long c = chunk; c <= block.chunk_of(static_cast<const unsigned char*>(p) + bytes - 1, 1); ++c)
    if (block.in_flight[c].load() != 0) fault(std::string(what) + " read shared memory a cp.async has not delivered");
}

}  // namespace pf_shim
