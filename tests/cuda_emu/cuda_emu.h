// A CUDA emulator just big enough to run sn_cuda's kernels on the CPU, for tests without a GPU.
//
// Force-included (g++ -include) before csrc/cuda/*.cu compiled as C++ with SN_CUDA_EMULATE:
// it defines the CUDA keywords, built-in variables and intrinsics the kernels use, and
// sn_cuda_emu::launch, which csrc/cuda/launch_utils.h calls instead of <<<...>>>.
//
// How a launch runs: blocks one after another (a legal schedule: the kernels' blocks never
// wait for each other, they only ask "am I the last to arrive?"), at most kMaxBlocks of them,
// so that the kernels' grid-stride loops run too; in the random schedule, in a random order. A block's threads are fibers (ucontext) on
// one OS thread; a fiber runs until it reaches __syncthreads or a warp shuffle, where it waits
// for the rest of its block or warp. Between two such points the fibers run in thread order,
// in reverse, or in a random order drawn anew each time (set_schedule): code that reads what
// another thread wrote without a barrier between them gets different results. __shared__ variables are function statics, one per
// kernel instantiation: shared by the block's fibers, as on a GPU. Threads that have exited no
// longer count at a barrier (as on sm_70+). Shared memory declared with SN_SHARED
// (csrc/cuda/device_utils.cuh) is filled with 0xFF bytes (NaN) at the start of every block.
// What a GPU faults on or leaves undefined stops the launch with an error (a RuntimeError in
// Python, naming it): a 16-byte access that is not 16-byte aligned, a full-mask shuffle after
// lanes of the warp have exited, threads of a block waiting at __syncthreads on different
// lines, a deadlock.
//
// What it checks: the arithmetic, indexing, tiling, reductions, "last block" protocols and
// host-side planning of the kernels, on every line. What it cannot: the memory model (fences,
// caches), real concurrency, launch limits, performance. The GPU tests do those.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
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
#define __shared__ static
#define SN_SHARED(type, name, count) \
  static type name[count];           \
  ::sn_cuda_emu::poison_shared(name, sizeof(name))

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
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // a kernel's frame holds its table parameter (<= 25 KB)

struct Runtime {
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts = std::vector<ucontext_t>(kMaxThreads);
  std::vector<std::vector<char>> stacks;
  std::vector<char> done = std::vector<char>(kMaxThreads);
  int threads = 0, live = 0, current = 0;
  int block_arrived = 0;
  unsigned int block_generation = 0;
  int warp_live[kMaxThreads / 32] = {};
  int warp_arrived[kMaxThreads / 32] = {};
  unsigned int warp_generation[kMaxThreads / 32] = {};
  unsigned char lanes[kMaxThreads][8] = {};  // values in flight through a shuffle
  std::function<void()> body;
  int order = 0;  // 0: thread order, 1: reverse, 2: random (seeded)
  std::mt19937_64 rng;
  std::vector<int> schedule;
  int barrier_line = 0;
  std::string failure;  // set by fail() in a fiber; the scheduler throws it  // the __syncthreads line the current block barrier's threads wait at
  uint64_t progress = 0;  // arrivals, releases and exits: a round without any is a deadlock
  uint64_t block_serial = 0;  // one per block run: which shared arrays are poisoned already
  std::map<void*, uint64_t> poisoned;
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

// The order in which the fibers of a block run between barriers (see the top of this file).
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

// The first thread of a block to reach an SN_SHARED declaration fills it with 0xFF bytes.
inline void poison_shared(void* p, size_t bytes) {
  Runtime& r = runtime();
  uint64_t& serial = r.poisoned[p];
  if (serial != r.block_serial) {
    serial = r.block_serial;
    std::memset(p, 0xFF, bytes);
  }
}

inline void fiber_main() {
  Runtime& r = runtime();
  r.body();
  ++r.progress;
  r.done[r.current] = 1;
  --r.live;
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

// Called in a fiber: stops this block's threads where they are (their stacks are simply
// abandoned: kernels hold nothing that needs destroying) and makes run_block throw.
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
  if (r.block_arrived == 0) {
    r.barrier_line = line;
  } else if (r.barrier_line != line) {
    fail("threads wait at __syncthreads on different lines (divergent barrier)");
  }
  wait_at(r.block_arrived, r.block_generation, r.live);
}

inline void warp_barrier() {
  Runtime& r = runtime();
  const int w = r.current / 32;
  wait_at(r.warp_arrived[w], r.warp_generation[w], r.warp_live[w]);
}

// Runs `body` as `threads` fibers (threadIdx.x = 0 .. threads - 1) until all have returned.
inline void run_block(int threads, std::function<void()> body) {
  Runtime& r = runtime();
  if (threads > kMaxThreads) throw std::runtime_error("cuda_emu: too many threads per block");
  if (r.stacks.size() < static_cast<size_t>(threads)) r.stacks.resize(threads);
  r.body = std::move(body);
  ++r.block_serial;
  r.threads = r.live = threads;
  r.block_arrived = 0;
  for (int w = 0; w < kMaxThreads / 32; ++w) {
    r.warp_live[w] = std::max(0, std::min(32, threads - 32 * w));
    r.warp_arrived[w] = 0;
  }
  for (int t = 0; t < threads; ++t) {
    if (r.stacks[t].empty()) r.stacks[t].resize(kStackBytes);
    getcontext(&r.contexts[t]);
    r.contexts[t].uc_stack.ss_sp = r.stacks[t].data();
    r.contexts[t].uc_stack.ss_size = r.stacks[t].size();
    r.contexts[t].uc_link = &r.scheduler;
    makecontext(&r.contexts[t], fiber_main, 0);
    r.done[t] = 0;
  }
  blockDim.x = static_cast<unsigned int>(threads);
  r.schedule.resize(threads);
  std::iota(r.schedule.begin(), r.schedule.end(), 0);
  if (r.order == 1) std::reverse(r.schedule.begin(), r.schedule.end());
  for (bool first = true; r.live > 0; first = false) {
    const uint64_t before = r.progress;
    if (r.order == 2) std::shuffle(r.schedule.begin(), r.schedule.end(), r.rng);
    for (const int t : r.schedule) {
      if (r.done[t]) continue;
      r.current = t;
      threadIdx.x = static_cast<unsigned int>(t);
      swapcontext(&r.scheduler, &r.contexts[t]);
      if (!r.failure.empty()) {
        const std::string failure = std::move(r.failure);
        r.failure.clear();
        throw std::runtime_error(failure);
      }
    }
    // Every live thread waits and none arrived, left or released: none ever will.
    if (!first && r.progress == before && r.live > 0) {
      throw std::runtime_error(
          "cuda_emu: deadlock in block " + std::to_string(blockIdx.x) + ": " +
          std::to_string(r.live) + " threads wait forever");
    }
  }
}

// kernel<<<grid, threads>>>(args...), run to completion.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int grid, int threads, Args&&... args) {
  const unsigned int blocks = std::min(grid, kMaxBlocks);
  gridDim.x = blocks;
  std::vector<unsigned int> order(blocks);
  std::iota(order.begin(), order.end(), 0u);
  if (runtime().order == 1) std::reverse(order.begin(), order.end());
  if (runtime().order == 2) std::shuffle(order.begin(), order.end(), runtime().rng);
  for (const unsigned int b : order) {
    blockIdx.x = b;
    run_block(threads, [&] { kernel(args...); });
  }
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
  if (r.warp_live[t / 32] < std::min(32, r.threads - (t - lane))) {
    sn_cuda_emu::fail("full-mask warp shuffle after lanes of the warp have exited");
  }
  std::memcpy(r.lanes[t], &value, sizeof(T));
  sn_cuda_emu::warp_barrier();  // every lane's value is in place
  const int source = lane + static_cast<int>(delta);
  T out = value;
  if (source / width == lane / width && source < 32) {  // inside this lane's segment
    std::memcpy(&out, r.lanes[t - lane + source], sizeof(T));
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
