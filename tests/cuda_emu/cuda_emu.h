// A CUDA emulator just big enough to run sn_cuda's kernels on the CPU, for tests without a GPU.
//
// Force-included (g++ -include) before csrc/cuda/*.cu compiled as C++ with SN_CUDA_EMULATE:
// it defines the CUDA keywords, built-in variables and intrinsics the kernels use, and
// sn_cuda_emu::launch, which csrc/cuda/launch_utils.h calls instead of <<<...>>>.
//
// How a launch runs: at most kMaxBlocks blocks (so that the kernels' grid-stride loops run
// too), all at once: every thread of every block is a fiber (ucontext) on one OS thread. A
// fiber runs until it reaches __syncthreads or a warp shuffle, where it waits for the rest of
// its block or warp. Between two such points the fibers of all blocks run in fiber order, in
// reverse, or in a random order drawn anew each time, with a random blockIdx for each block
// (set_schedule): code that reads what another thread or block wrote without the barrier or
// the "last to arrive" protocol in between gets different results. Threads that have exited no
// longer count at a barrier (as on sm_70+). Shared memory is declared with SN_SHARED
// (csrc/cuda/device_utils.cuh): each block gets its own, filled with 0xFF bytes (NaN) at first.
// What a GPU faults on or leaves undefined stops the launch with an error (a RuntimeError in
// Python, naming it): a 16-byte access that is not 16-byte aligned, a full-mask shuffle after
// lanes of the warp have exited, threads of a block waiting at __syncthreads on different
// lines, a deadlock.
//
// What it checks: the arithmetic, indexing, tiling, reductions, "last block" protocols and
// host-side planning of the kernels, on every line. What it cannot: the memory model (fences,
// caches: atomics and fences are plain memory operations here), true parallelism, launch
// limits, performance. The GPU tests do those.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static_assert(false, "cuda_emu: declare shared memory with SN_SHARED (device_utils.cuh)");
#define SN_SHARED(type, name, count)                                                   \
  static const char name##_key = 0;                                                     \
  type(&name)[count] =                                                                  \
      *static_cast<type(*)[count]>(::sn_cuda_emu::block_shared(&name##_key, sizeof(type) * (count)))

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

// The running fiber's coordinates. External linkage, so that the compiler reloads them after
// every switch (a switch is an opaque call that may write them).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace sn_cuda_emu {

constexpr unsigned int kMaxBlocks = 3;
constexpr size_t kStackBytes = 256 * 1024;  // a kernel's frame holds its table parameter (<= 25 KB)

// One launch's state: fiber f is thread f % threads of block f / threads.
struct Runtime {
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts;
  std::vector<std::unique_ptr<char[]>> stacks;  // uninitialised: pages are touched as used
  std::vector<char> done;
  std::vector<unsigned int> block_of;  // the blockIdx.x of each fiber's block
  int threads = 0, live = 0, current = 0;
  // Per block: threads still running, the __syncthreads barrier, its line.
  std::vector<int> block_live, block_arrived, barrier_line;
  std::vector<unsigned int> block_generation;
  // Per warp (fiber / 32, blocks hold whole warps): lanes still running, the shuffle barrier.
  std::vector<int> warp_live, warp_arrived;
  std::vector<unsigned int> warp_generation;
  std::vector<std::array<unsigned char, 8>> lanes;  // values in flight through a shuffle
  // Per (block, SN_SHARED declaration): the block's shared array.
  std::map<std::pair<unsigned int, const void*>, std::vector<unsigned char>> shared;
  std::function<void()> body;
  int order = 0;  // 0: fiber order, 1: reverse, 2: random (seeded)
  std::mt19937_64 rng;
  std::vector<int> schedule;
  std::string failure;  // set by fail() in a fiber; the scheduler throws it
  uint64_t progress = 0;  // arrivals, releases and exits: a round without any is a deadlock
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

// The order in which the fibers run between barriers (see the top of this file).
inline void set_schedule(int order, uint64_t seed) {
  if (order < 0 || order > 2) throw std::invalid_argument("cuda_emu: order must be 0, 1 or 2");
  runtime().order = order;
  runtime().rng.seed(seed);
}

// Back to the scheduler; returns when the scheduler switches to this fiber again.
inline void yield() {
  Runtime& r = runtime();
  swapcontext(&r.contexts[r.current], &r.scheduler);
}

// The running block's array for the SN_SHARED declaration `key`, 0xFF bytes when new.
inline void* block_shared(const void* key, size_t bytes) {
  Runtime& r = runtime();
  std::vector<unsigned char>& mem = r.shared[{blockIdx.x, key}];
  if (mem.empty()) mem.assign(bytes + 16, 0xFF);
  return mem.data() + (16 - reinterpret_cast<uintptr_t>(mem.data()) % 16) % 16;  // 16-aligned
}

inline void fiber_main() {
  Runtime& r = runtime();
  r.body();
  ++r.progress;
  r.done[r.current] = 1;
  --r.live;
  --r.block_live[r.current / r.threads];
  --r.warp_live[r.current / 32];
  // Returning resumes uc_link: the scheduler.
}

// Waits until every live thread counted by `live` has arrived at the barrier of this generation.
inline void wait_at(int& arrived, unsigned int& generation, const int& live) {
  Runtime& r = runtime();
  const unsigned int mine = generation;
  ++arrived;
  ++r.progress;
  while (generation == mine) {
    if (arrived >= live) {  // the last to arrive (or the rest have exited): release everyone
      arrived = 0;
      ++generation;
      ++r.progress;
      break;
    }
    yield();
  }
}

// Called in a fiber: stops the launch's threads where they are (their stacks are simply
// abandoned: kernels hold nothing that needs destroying) and makes run_grid throw.
[[noreturn]] inline void fail(const char* what) {
  Runtime& r = runtime();
  char message[256];
  std::snprintf(message, sizeof(message), "cuda_emu: %s (block %u, thread %u)", what, blockIdx.x, threadIdx.x);
  r.failure = message;
  swapcontext(&r.contexts[r.current], &r.scheduler);
  std::abort();  // never resumed
}

inline void block_barrier(int line) {
  Runtime& r = runtime();
  const int b = r.current / r.threads;
  if (r.block_arrived[b] == 0) {
    r.barrier_line[b] = line;
  } else if (r.barrier_line[b] != line) {
    fail("threads wait at __syncthreads on different lines (divergent barrier)");
  }
  wait_at(r.block_arrived[b], r.block_generation[b], r.block_live[b]);
}

inline void warp_barrier() {
  Runtime& r = runtime();
  const int w = r.current / 32;
  wait_at(r.warp_arrived[w], r.warp_generation[w], r.warp_live[w]);
}

// Runs `body` as `blocks` x `threads` fibers, all at once, until all have returned.
inline void run_grid(const std::vector<unsigned int>& block_ids, int threads, std::function<void()> body) {
  Runtime& r = runtime();
  if (threads % 32 != 0) throw std::runtime_error("cuda_emu: blocks of whole warps only");
  const int blocks = static_cast<int>(block_ids.size()), fibers = blocks * threads;
  r.contexts.resize(fibers);
  r.stacks.resize(std::max<size_t>(r.stacks.size(), fibers));
  r.done.assign(fibers, 0);
  r.block_of.resize(fibers);
  r.lanes.resize(fibers);
  r.body = std::move(body);
  r.threads = threads;
  r.live = fibers;
  r.block_live.assign(blocks, threads);
  r.block_arrived.assign(blocks, 0);
  r.barrier_line.assign(blocks, 0);
  r.block_generation.assign(blocks, 0);
  r.warp_live.assign(fibers / 32, 32);
  r.warp_arrived.assign(fibers / 32, 0);
  r.warp_generation.assign(fibers / 32, 0);
  r.shared.clear();
  for (int f = 0; f < fibers; ++f) {
    if (!r.stacks[f]) r.stacks[f].reset(new char[kStackBytes]);
    getcontext(&r.contexts[f]);
    r.contexts[f].uc_stack.ss_sp = r.stacks[f].get();
    r.contexts[f].uc_stack.ss_size = kStackBytes;
    r.contexts[f].uc_link = &r.scheduler;
    makecontext(&r.contexts[f], fiber_main, 0);
    r.block_of[f] = block_ids[f / threads];
  }
  blockDim.x = static_cast<unsigned int>(threads);
  r.schedule.resize(fibers);
  std::iota(r.schedule.begin(), r.schedule.end(), 0);
  if (r.order == 1) std::reverse(r.schedule.begin(), r.schedule.end());
  for (bool first = true; r.live > 0; first = false) {
    const uint64_t before = r.progress;
    if (r.order == 2) std::shuffle(r.schedule.begin(), r.schedule.end(), r.rng);
    for (const int f : r.schedule) {
      if (r.done[f]) continue;
      r.current = f;
      blockIdx.x = r.block_of[f];
      threadIdx.x = static_cast<unsigned int>(f % threads);
      swapcontext(&r.scheduler, &r.contexts[f]);
      if (!r.failure.empty()) {
        const std::string failure = std::move(r.failure);
        r.failure.clear();
        throw std::runtime_error(failure);
      }
    }
    // Every live thread waits and none arrived, left or released: none ever will.
    if (!first && r.progress == before && r.live > 0) {
      throw std::runtime_error("cuda_emu: deadlock: " + std::to_string(r.live) + " threads wait forever");
    }
  }
}

// kernel<<<grid, threads>>>(args...), run to completion: at most kMaxBlocks blocks (the
// kernels stride over their items), in the random schedule with a random choice of blockIdx.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int grid, int threads, Args&&... args) {
  const unsigned int blocks = std::min(grid, kMaxBlocks);
  gridDim.x = blocks;
  std::vector<unsigned int> block_ids(blocks);
  std::iota(block_ids.begin(), block_ids.end(), 0u);
  if (runtime().order == 2) std::shuffle(block_ids.begin(), block_ids.end(), runtime().rng);
  run_grid(block_ids, threads, [&] { kernel(args...); });
}

}  // namespace sn_cuda_emu

// ---- intrinsics --------------------------------------------------------------------------
#define __syncthreads() ::sn_cuda_emu::block_barrier(__LINE__)
inline void __threadfence() {}

template <typename T>
T __shfl_down_sync(unsigned int /*mask*/, T value, unsigned int delta, int width = 32) {
  static_assert(sizeof(T) <= 8, "cuda_emu: shuffles of up to 8 bytes");
  sn_cuda_emu::Runtime& r = sn_cuda_emu::runtime();
  const int t = r.current, lane = t % 32;
  if (r.warp_live[t / 32] < 32) {
    sn_cuda_emu::fail("full-mask warp shuffle after lanes of the warp have exited");
  }
  std::memcpy(r.lanes[t].data(), &value, sizeof(T));
  sn_cuda_emu::warp_barrier();  // every lane's value is in place
  const int source = lane + static_cast<int>(delta);
  T out = value;
  if (source / width == lane / width && source < 32) {  // inside this lane's segment
    std::memcpy(&out, r.lanes[t - lane + source].data(), sizeof(T));
  }
  sn_cuda_emu::warp_barrier();  // every lane has read before any writes the next value
  return out;
}

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old + value;
  return old;
}

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) sn_cuda_emu::fail("misaligned vector access");
}

template <typename T>
T __ldg(const T* p) {
  check_aligned(p, sizeof(T));
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
template <typename T>
void __stcg(T* p, T value) {
  check_aligned(p, sizeof(T));
  *p = value;
}
