// The per-call layer tables the fused kernels read: one entry per layer, built on the host and
// passed to the kernels by value, as a kernel parameter (LayerTable below), indexed by
// (layer, tile) items.
//
// Plain structs of fixed-width integers and pointers only: the host compiler (g++) and nvcc
// must lay them out identically, and the host copies them as bytes.
//
// Why by value, not a table in device memory: a table copied host-to-device comes from pinned
// host memory, and a CUDA graph that captured that copy reads the host block again at every
// replay, after torch's host allocator may have handed the block to someone else (torch fixed
// its allocator for this only in late 2025, pytorch#167507). A kernel parameter is baked into
// the graph. It also spares every call a pinned allocation and a copy op on the host.
//
// A weight of any shape is the matrix rows = shape[dim] by cols = numel / rows, addressed in
// place as (pre, rows, post) with pre = prod(shape[:dim]), post = prod(shape[dim+1:]):
// element (r, c), c = p * post + q, is at p * rows * post + r * post + q. Nothing is permuted.
#pragma once

#include <cstdint>

// The sizing helpers below are used by host code and by kernels.
#if defined(__CUDACC__)
#define SN_CUDA_HOST_DEVICE __host__ __device__
#else
#define SN_CUDA_HOST_DEVICE
#endif

namespace sn_cuda {

// Every kernel runs blocks of this many threads (the tilings below assume it).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Power iteration: one layer of launches A (s = W v) and B (t = W^T u).
struct PowerLayer {
  const void* w;       // contiguous weight, the weight dtype
  void* u;             // u buffer (rows elements, stride u_stride), the weight dtype
  void* v;             // v buffer (cols elements, stride v_stride), the weight dtype
  int64_t u_stride;
  int64_t v_stride;
  int64_t pre, rows, post, cols;
  // Launch A: items of rows_per_item = kThreads / a_tpr rows, a_tpr threads per row.
  int64_t a_begin;     // first item of this layer, counted from its chunk's first layer
  int64_t a_items;
  int64_t a_tpr;       // threads per row: a power of two in [4, kThreads]
  // Launch B: items (column block, row chunk); b_width threads per column block.
  int64_t b_begin;
  int64_t b_items;     // b_col_blocks * b_chunks
  int64_t b_width;     // columns per item: a power of two in [32, kThreads]
  int64_t b_col_blocks;
  int64_t b_chunk_rows;  // rows per chunk
  int64_t b_chunks;
  // Offsets, in accumulator elements, into the call's scratch: s = W v (rows), t = W^T u
  // (cols), and launch B's per-chunk column sums ([b_chunks][cols]).
  int64_t s_off, t_off, part_off;
  // Offset of u in the packed uv output (v follows at uv_off + rows).
  int64_t uv_off;
  // Indices into the call's counters: layer done in A, layer done in B, and the first of
  // b_col_blocks column-block counters of B.
  int64_t ctr_a, ctr_b, ctr_cols;
};

// Elementwise passes (W/sigma, and the backward's reduction and update): one layer of a flat
// loop over contiguous elements, in items of elementwise_item_elems(element size) elements.
struct ElementLayer {
  const void* in;      // W (normalize) or the gradient G (backward)
  const void* in2;     // W/sigma (backward), unused by normalize
  void* out;           // W/sigma (normalize) or dL/dW (backward)
  int64_t numel;
  int64_t begin;       // first item of this layer, counted from its chunk's first layer
  int64_t items;
  int64_t rows, post;  // the (pre, rows, post) view, for u_r and v_c in the backward
  int64_t uv_off;      // offset of u in uv (v follows at uv_off + rows)
  int64_t aligned;     // 1 when in, in2 and out are 16-byte aligned: vector loads and stores
};

// A launch's layers, as one kernel parameter. Kernels take it as `const __grid_constant__`, so
// indexing it with a runtime layer number reads the parameter in place (constant bank) rather
// than copying it to per-thread local memory (tests/test_kernel_ptx.py checks the PTX).
template <typename Layer, int Capacity>
struct LayerTable {
  static constexpr int kCapacity = Capacity;
  Layer layer[Capacity];
};

// Layers per launch. A call with more layers runs in chunks of kTableCapacity, a few more
// launches per chunk; the model suites have at most 64 layers. A chunk gets the smallest of
// three tables that holds it (SNGAN's 11 layers: 16; BigGAN-128 D's 23 and 64 small convs: 64),
// because the driver copies a kernel's whole parameter block at every launch.
constexpr int kSmallTable = 16;
constexpr int kMediumTable = 64;
constexpr int kTableCapacity = 128;
// Kernel parameters may take 32764 bytes (CUDA >= 12.1, sm_70 and newer; the driver too: an
// older one refuses the launch of a chunk over 4 KB, 16 or more layers); every kernel's other
// parameters fit in the 256 bytes left.
static_assert(sizeof(LayerTable<PowerLayer, kTableCapacity>) + 256 <= 32764, "table too big");
static_assert(sizeof(LayerTable<ElementLayer, kTableCapacity>) + 256 <= 32764, "table too big");
#if defined(__CUDACC__) && \
    (__CUDACC_VER_MAJOR__ < 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 1))
#error "sn_cuda needs CUDA 12.1 or newer: its layer tables are kernel parameters of up to 25 KB"
#endif

// Elements per thread per pass of the elementwise kernels: 16 bytes (one vector) ...
SN_CUDA_HOST_DEVICE constexpr int vector_elems(int elem_size) { return 16 / elem_size; }
// ... times this many vectors per thread per item.
constexpr int kElementUnroll = 4;
SN_CUDA_HOST_DEVICE constexpr int64_t elementwise_item_elems(int elem_size) {
  return int64_t{kThreads} * vector_elems(elem_size) * kElementUnroll;
}

}  // namespace sn_cuda
