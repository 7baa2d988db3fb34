// How one op call's layers reach the kernels: the layer table by value, chunk by chunk, the
// call's device scratch (counters and accumulators) in one allocation, and the launches.
//
// Everything the op files need from the CUDA runtime goes through this file (the stream, the
// launch and its check, the memset, the registration), so that tests/cuda_emu can compile the
// same op files as plain C++ with SN_CUDA_EMULATE defined and run every kernel on the CPU,
// every thread of a launch as a fiber (tests/test_kernels_emulated.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#ifndef SN_CUDA_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#endif

#include "cuda/host_utils.h"
#include "layer_table.h"

namespace sn_cuda {

// Layers go to the kernels in chunks of kTableCapacity consecutive layers, and items are
// numbered from each chunk's first layer: a plan restarts its item count at these layers.
inline bool starts_chunk(size_t layer) { return layer % kTableCapacity == 0; }

// layers[first, first + count) as a table of `Capacity` entries; the entries past `count` are
// zeros (never read: kernels only look up layers below their num_layers argument, but the
// bytes go into every launch and every captured graph node).
template <int Capacity, typename Layer>
LayerTable<Layer, Capacity> table_of(const std::vector<Layer>& layers, size_t first, size_t count) {
  LayerTable<Layer, Capacity> table;
  std::memcpy(table.layer, layers.data() + first, count * sizeof(Layer));
  std::memset(table.layer + count, 0, (Capacity - count) * sizeof(Layer));
  return table;
}

// A chunk's first layer owns its chunk's first items (item numbers restart at starts_chunk).
inline bool numbered_from_zero(const PowerLayer& first) {
  return first.a_begin == 0 && first.b_begin == 0;
}
inline bool numbered_from_zero(const ElementLayer& first) { return first.begin == 0; }

// The layer table of an elementwise op (normalize, normalize_backward), built layer by layer:
// items numbered from each chunk's first layer, the packed uv's offsets, and whether the
// layer's tensors allow 16-byte accesses. (power_iteration.cu's PowerPlan is its twin.)
struct ElementPlan {
  std::vector<ElementLayer> layers;
  int64_t items = 0;        // in the current chunk
  int64_t total_items = 0;  // over all chunks: the backward's partials
  int64_t uv_elems = 0;     // rows + cols over all layers: the packed uv's length

  // `in2` may be null (normalize reads one tensor); `elem` is the element size in bytes.
  void add(const void* in, const void* in2, void* out, int64_t numel, int elem, MatrixView m) {
    if (starts_chunk(layers.size())) items = 0;
    ElementLayer L{};
    L.in = in;
    L.in2 = in2;
    L.out = out;
    L.numel = numel;
    L.begin = items;
    L.items = std::max<int64_t>(1, ceil_div(numel, elementwise_item_elems(elem)));
    items += L.items;
    total_items += L.items;
    L.rows = m.rows;
    L.post = m.post;
    L.uv_off = uv_elems;
    uv_elems += m.rows + m.cols;
    L.aligned = aligned16(in) && (in2 == nullptr || aligned16(in2)) && aligned16(out);
    layers.push_back(L);
  }
};

// Calls launch(table, first, count) for each chunk of the call's layers, in layer order, with
// the smallest LayerTable that holds the chunk. `launch` is a generic lambda: it reads the
// table's capacity from its type (std::decay_t<decltype(table)>::kCapacity) to pick the kernel.
// (The table is ~25 KB at most, on the host stack: fine on any thread torch runs ops on.)
template <typename Layer, typename Launch>
void for_each_chunk(const std::vector<Layer>& layers, Launch&& launch) {
  for (size_t first = 0; first < layers.size(); first += kTableCapacity) {
    TORCH_INTERNAL_ASSERT(
        numbered_from_zero(layers[first]), "sn_cuda: the plan did not restart its item numbers "
        "at layer ", first, " (starts_chunk and for_each_chunk disagree)");
    const size_t count = std::min<size_t>(layers.size() - first, kTableCapacity);
    if (count <= kSmallTable) {
      launch(table_of<kSmallTable>(layers, first, count), first, count);
    } else if (count <= kMediumTable) {
      launch(table_of<kMediumTable>(layers, first, count), first, count);
    } else {
      launch(table_of<kTableCapacity>(layers, first, count), first, count);
    }
  }
}

// The stream the call's work goes to: the current CUDA stream.
#ifdef SN_CUDA_EMULATE
using Stream = int;  // the emulator runs each launch to completion, in call order
inline Stream current_stream() { return 0; }
#else
using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
#endif

// Grid size for `items` work items (the kernels also stride over items, for huge calls).
inline unsigned int grid_for(int64_t items) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(items, 1), 1 << 30));
}

// kernel<<<grid_for(items), kThreads, 0, stream>>>(args...), then the launch check.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t items, Stream stream, Args&&... args) {
#ifdef SN_CUDA_EMULATE
  (void)stream;
  sn_cuda_emu::launch(kernel, grid_for(items), kThreads, std::forward<Args>(args)...);
#else
  kernel<<<grid_for(items), kThreads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// One call's scratch on the device: [counters | accumulators].
struct Scratch {
  at::Tensor buffer;  // keeps the allocation alive until the call's kernels are queued
  unsigned int* counters = nullptr;
  void* acc = nullptr;
};

// One allocation from the caching allocator. The counters are zeroed by one memset on `stream`
// (a memset node when a CUDA graph captures the call); the kernels leave every counter at zero
// when they finish with it. The accumulators are left uninitialised: the kernels write every
// accumulator before reading it. No host-device synchronization.
inline Scratch make_scratch(
    int64_t num_counters, int64_t acc_bytes, const at::Device& device, Stream stream) {
  const int64_t head = round_up(num_counters * int64_t{sizeof(unsigned int)}, 16);
  Scratch s;
  s.buffer = at::empty({head + acc_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  uint8_t* d = static_cast<uint8_t*>(s.buffer.data_ptr());
  if (head > 0) {
#ifdef SN_CUDA_EMULATE
    (void)stream;
    std::memset(d, 0, static_cast<size_t>(head));
#else
    C10_CUDA_CHECK(cudaMemsetAsync(d, 0, static_cast<size_t>(head), stream));
#endif
  }
  s.counters = reinterpret_cast<unsigned int*>(d);
  s.acc = d + head;
  return s;
}

}  // namespace sn_cuda

// Registers an op file's kernels: for CUDA tensors, or, in the emulated build, for CPU tensors,
// under the test-only namespace sn_cuda_emu (same schemas) or as sn_cuda's own CPU kernels
// (tests/cuda_emu/build.py).
#if defined(SN_CUDA_EMULATE) && defined(SN_CUDA_EMULATE_AS_SN_CUDA)
#define SN_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(sn_cuda, CPU, m)
#elif defined(SN_CUDA_EMULATE)
#define SN_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(sn_cuda_emu, CPU, m)
#else
#define SN_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(sn_cuda, CUDA, m)
#endif
