// Device helpers shared by the fused kernels: fixed-order reductions, the item -> layer
// lookup, the "last block of a group finishes the work" protocol, and 16-byte vectors.
//
// Every reduction here has an order that depends only on the sizes involved, never on
// scheduling, so reruns on the same inputs are bit-identical.
#pragma once

#include <cstdint>
#include <cstring>

#include "layer_table.h"

// Block-shared memory: `count` values of `type`, declared through this macro so that the CUDA
// emulator of the tests (tests/cuda_emu) can fill it with garbage at the start of every block,
// as a GPU's shared memory starts (a read before any write then shows up there too).
#ifndef SN_SHARED
#define SN_SHARED(type, name, count) __shared__ type name[count]
#endif

namespace sn_cuda {

// A = float or double: the accumulation type.
__device__ __forceinline__ float acc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double acc_sqrt(double x) { return sqrt(x); }

// max(x, eps) that keeps a NaN norm NaN, as torch's clamp_min does.
template <typename A>
__device__ __forceinline__ A clamp_min(A x, A eps) {
  return x < eps ? eps : x;
}

// Loads a value another block stored during this launch: through L2, skipping L1, so a line
// this SM cached earlier can never be returned stale.
template <typename A>
__device__ __forceinline__ A load_global(const A* p) {
  return __ldcg(p);
}

// Sum over the block, the same tree every time: each warp reduces by shuffles, then warp 0
// reduces the warp sums. Every thread of the block must call it; all get the total.
template <typename A>
__device__ A block_sum(A val) {
  SN_SHARED(A, warp_sums, kWarps + 1);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) val += __shfl_down_sync(0xffffffffu, val, off);
  __syncthreads();  // an earlier call's readers are done with warp_sums
  if (lane == 0) warp_sums[warp] = val;
  __syncthreads();
  if (warp == 0) {
    val = lane < kWarps ? warp_sums[lane] : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) val += __shfl_down_sync(0xffffffffu, val, off);
    if (lane == 0) warp_sums[kWarps] = val;
  }
  __syncthreads();
  return warp_sums[kWarps];
}

// Sum over consecutive groups of `group` threads (a power of two, 4..kThreads, the same in the
// whole block). The group's total is returned in its first thread (threadIdx.x % group == 0);
// other threads get partial sums. Every thread of the block must call it.
template <typename A>
__device__ A group_sum(A val, int group) {
  const int width = group < 32 ? group : 32;
  for (int off = width / 2; off > 0; off >>= 1) val += __shfl_down_sync(0xffffffffu, val, off, width);
  if (group <= 32) return val;
  SN_SHARED(A, warp_sums, kWarps);
  __syncthreads();  // an earlier call's readers are done with warp_sums
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = val;
  __syncthreads();
  A total = 0;
  if (threadIdx.x % group == 0) {
    const int first = threadIdx.x / 32;
    for (int i = 0; i < group / 32; ++i) total += warp_sums[first + i];
  }
  return total;
}

// The layer that owns `item`: the last l with begin(l) <= item (begin(0) == 0, and every layer
// owns at least one item, so begins strictly increase).
template <typename Begin>
__device__ int find_layer(int num_layers, int64_t item, Begin begin) {
  int lo = 0, hi = num_layers - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (begin(mid) <= item) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Called by every thread of a block once its results for a group of `expected` blocks are
// stored: true (in every thread) in the block that arrives last, which may then read what the
// whole group stored (with load_global). The last block resets the counter to zero, so the
// next launch that uses it finds it zero.
__device__ inline bool arrive_last(unsigned int* counter, int64_t expected) {
  SN_SHARED(bool, is_last, 1);
  __threadfence();  // this thread's stores are visible device-wide before the block signals
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int prev = atomicAdd(counter, 1u);
    is_last[0] = int64_t{prev} + 1 == expected;
    if (is_last[0]) *counter = 0u;  // every block of the group has arrived: nobody reads it now
  }
  __syncthreads();
  const bool last = is_last[0];
  if (last) __threadfence();  // order this block's following loads after the counter
  return last;
}

// N consecutive T in one 16-byte load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

// A Pack's 16-byte load and store, as the vector instructions themselves (__ldg / __stcg on
// uint4). A plain struct copy (`*(V*)p = v`), or even a uint4 assignment, compiled to one scalar
// access per element for every store and for the loads of 2-byte types (nvcc 13.0, sm_90
// PTX: the aligned path's stores were split to match the scalar tail path beside them).
// `src`/`dst` must be 16-byte aligned; `src` must not be written during the kernel.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* src) {
  static_assert(sizeof(Pack<T, N>) == sizeof(uint4), "16-byte packs only");
  const uint4 bits = __ldg(reinterpret_cast<const uint4*>(src));
  Pack<T, N> v;
  memcpy(&v, &bits, sizeof(bits));
  return v;
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, N>& v) {
  static_assert(sizeof(Pack<T, N>) == sizeof(uint4), "16-byte packs only");
  uint4 bits;
  memcpy(&bits, &v, sizeof(bits));
  __stcg(reinterpret_cast<uint4*>(dst), bits);
}

// This thread's packs of one elementwise item (layer_table.h): pack k starts at element
// base + k * kThreads * N. Loads those that lie wholly inside an aligned layer, all issued
// before any arithmetic; the caller handles the others (misaligned layer, tail) element by
// element with the same test.
template <typename T, int N>
__device__ __forceinline__ void load_item_packs(
    const T* src, bool aligned, int64_t numel, int64_t base, Pack<T, N> (&x)[kElementUnroll]) {
#pragma unroll
  for (int k = 0; k < kElementUnroll; ++k) {
    const int64_t e = base + int64_t{k} * kThreads * N;
    if (aligned && e + N <= numel) x[k] = load_pack<T, N>(src + e);
  }
}

}  // namespace sn_cuda
