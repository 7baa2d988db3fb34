// sn_cuda::power_iteration on CUDA: power iteration and sigma for every layer of the call, in
// two launches per iteration whatever the number of layers up to kTableCapacity (one launch in
// eval mode); a call with more layers runs them chunk by chunk (launch_utils.h).
//
//   launch A (matvec_rows_kernel): s = W v. Items are (layer, block of rows), a_tpr threads per
//     row; each row's sum is complete inside its item. The last item of a layer to finish
//     normalizes s into u (training) or takes sigma = u . s (eval).
//   launch B (matvec_cols_kernel): t = W^T u. Items are (layer, block of columns, chunk of
//     rows); each writes its column sums for its chunk, the last chunk of a column block adds
//     the chunks in chunk order, and the last column block of a layer normalizes t into v.
//
// Parametrization order (u_first): A then B, sigma = v . t (= u . W v with the new u, v).
// Hook order: B then A, sigma = u . s. So training never reads W a third time. The schema is
// defined in Python (sn_cuda/schemas.py); this file only adds the CUDA kernel.
//
// The vectors live in the accumulation type between launches: each normalization writes the
// packed uv output (float32 for float16/bfloat16 weights) and, rounded, the u or v buffer; the
// first launch of a call reads the buffer, every later one reads uv. So float16/bfloat16
// iterate in float32 throughout, as the reference does, and sigma uses the float32 vectors.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/device_utils.cuh"
#include "cuda/host_utils.h"
#include "cuda/launch_utils.h"
#include "layer_table.h"

namespace sn_cuda {
namespace {

// Launch B: elements per item (columns per item x rows per chunk).
constexpr int64_t kColItemElems = 16384;
// Launch A: threads per row grow until a thread has at most this many elements of its row.
constexpr int64_t kRowElemsPerThread = 16;

// y = x / max(|x|, eps) for one vector of n, by a whole block: rounded into the buffer
// (`stride` apart), unrounded into the uv snapshot (what the next launch reads and sigma uses);
// with `sigma` (the same for the whole block), also *sigma = y . x, torch's u . W v in the hook
// order (x = W v, y = u) and v . W^T u in the parametrization order: summed as products of y
// and x, not as |x|^2 / max(|x|, eps), whose |x|^2 underflows for a weight near 1e-18 in
// float32 where torch's sigma is still finite. x was written by other blocks: read from L2.
template <typename T, typename A>
__device__ __forceinline__ void normalize_into(
    const A* x, int64_t n, T* buffer, int64_t stride, A* snapshot, A eps, A* sigma) {
  A part = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const A xi = load_global(x + i);
    part += xi * xi;
  }
  const A denom = clamp_min(acc_sqrt(block_sum(part)), eps);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const A yi = load_global(x + i) / denom;
    buffer[i * stride] = static_cast<T>(yi);
    snapshot[i] = yi;
  }
  if (sigma != nullptr) {
    // Its own loop over what this thread just wrote (no barrier needed): summed inside the
    // loop above, the bf16/fp16 instantiations of launch A got a stack frame (ptxas, sm_90).
    A dot = 0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) dot += snapshot[i] * load_global(x + i);
    const A s = block_sum(dot);
    if (threadIdx.x == 0) *sigma = s;
  }
}

// u = s / max(|s|, eps) (training) or sigma = u . s (eval), for one layer, by its last block of
// launch A. Training with `write_sigma` (hook order, last iteration) also writes
// sigma = u . s. The uv snapshot receives the vectors sigma uses.
template <typename T, typename A>
__device__ void finish_rows(
    const PowerLayer& L, int l, const A* s, A* sigmas, A* uv, A eps, bool eval, bool write_sigma) {
  T* u = static_cast<T*>(L.u);
  A* uv_u = uv + L.uv_off;
  if (eval) {
    const T* v = static_cast<const T*>(L.v);
    A part = 0;
    for (int64_t i = threadIdx.x; i < L.rows; i += kThreads) {
      const A ui = static_cast<A>(u[i * L.u_stride]);
      part += ui * load_global(s + i);
      uv_u[i] = ui;
    }
    for (int64_t c = threadIdx.x; c < L.cols; c += kThreads) {
      uv_u[L.rows + c] = static_cast<A>(v[c * L.v_stride]);
    }
    const A sigma = block_sum(part);
    if (threadIdx.x == 0) sigmas[l] = sigma;
    return;
  }
  normalize_into<T>(s, L.rows, u, L.u_stride, uv_u, eps, write_sigma ? sigmas + l : nullptr);
}

// v = t / max(|t|, eps) for one layer, by its last block of launch B; with `write_sigma`
// (parametrization order, last iteration) also sigma = v . t.
template <typename T, typename A>
__device__ void finish_cols(
    const PowerLayer& L, int l, const A* t, A* sigmas, A* uv, A eps, bool write_sigma) {
  normalize_into<T>(
      t, L.cols, static_cast<T*>(L.v), L.v_stride, uv + L.uv_off + L.rows, eps,
      write_sigma ? sigmas + l : nullptr);
}

// Launch A: s = W v for every layer of the chunk (`sigmas` starts at its first layer; acc,
// counters and uv are the whole call's, indexed by the table's offsets).
template <typename T, typename A, int Cap>
__global__ void __launch_bounds__(kThreads) matvec_rows_kernel(
    const __grid_constant__ LayerTable<PowerLayer, Cap> table, int num_layers,
    int64_t total_items, A* acc, unsigned int* counters, A* sigmas, A* uv, A eps, bool eval,
    bool vectors_from_uv, bool write_sigma) {
  for (int64_t item = blockIdx.x; item < total_items; item += gridDim.x) {
    const int l = find_layer(num_layers, item, [&](int i) { return table.layer[i].a_begin; });
    const PowerLayer& L = table.layer[l];
    const int tpr = static_cast<int>(L.a_tpr);
    const int lane = threadIdx.x % tpr;
    const int64_t r = (item - L.a_begin) * (kThreads / tpr) + threadIdx.x / tpr;
    A sum = 0;
    if (r < L.rows && L.cols > 0) {  // cols > 0 implies post > 0
      const T* w = static_cast<const T*>(L.w);
      const T* v = static_cast<const T*>(L.v);
      const A* v_acc = uv + L.uv_off + L.rows;
      if (L.pre == 1) {
        // dim 0 (the usual case): row r is contiguous. Same order of terms as below.
        const T* row = w + r * L.cols;
#pragma unroll 4
        for (int64_t c = lane; c < L.cols; c += tpr) {
          const A vc = vectors_from_uv ? v_acc[c] : static_cast<A>(v[c * L.v_stride]);
          sum += static_cast<A>(row[c]) * vc;
        }
      } else {
        const int64_t post = L.post, slab = L.rows * post, row_off = r * post;
        // (p, q) of column c = lane, lane + tpr, ...: stepped, not divided, per element.
        int64_t p = lane / post, q = lane % post;
        const int64_t dp = tpr / post, dq = tpr % post;
        for (int64_t c = lane; c < L.cols; c += tpr) {
          const A vc = vectors_from_uv ? v_acc[c] : static_cast<A>(v[c * L.v_stride]);
          sum += static_cast<A>(w[p * slab + row_off + q]) * vc;
          p += dp;
          q += dq;
          if (q >= post) {
            q -= post;
            ++p;
          }
        }
      }
    }
    sum = group_sum(sum, tpr);
    A* s = acc + L.s_off;
    if (lane == 0 && r < L.rows) s[r] = sum;
    if (arrive_last(counters + L.ctr_a, L.a_items)) {
      finish_rows<T, A>(L, l, s, sigmas, uv, eps, eval, write_sigma);
    }
    __syncthreads();  // shared memory is reused by the next item
  }
}

// Launch B: t = W^T u for every layer of the chunk (arguments as launch A's).
// At least 4 blocks per SM (<= 64 registers): left to its own occupancy target (48 registers),
// ptxas spilled a register here (nvcc 13.0, float32 on sm_90, float64 on sm_80).
template <typename T, typename A, int Cap>
__global__ void __launch_bounds__(kThreads, 4) matvec_cols_kernel(
    const __grid_constant__ LayerTable<PowerLayer, Cap> table, int num_layers,
    int64_t total_items, A* acc, unsigned int* counters, A* sigmas, A* uv, A eps,
    bool vectors_from_uv, bool write_sigma) {
  SN_SHARED(A, col_sums, kThreads);
  for (int64_t item = blockIdx.x; item < total_items; item += gridDim.x) {
    const int l = find_layer(num_layers, item, [&](int i) { return table.layer[i].b_begin; });
    const PowerLayer& L = table.layer[l];
    const int width = static_cast<int>(L.b_width);
    const int groups = kThreads / width;
    const int j = threadIdx.x % width, g = threadIdx.x / width;
    const int64_t local = item - L.b_begin;
    const int64_t col_block = local % L.b_col_blocks, chunk = local / L.b_col_blocks;
    const int64_t c = col_block * width + j;
    const int64_t chunk_end = (chunk + 1) * L.b_chunk_rows;
    const int64_t r_end = chunk_end < L.rows ? chunk_end : L.rows;
    A sum = 0;
    if (c < L.cols) {  // cols > 0 implies post > 0
      const int64_t p = c / L.post, q = c - p * L.post;
      const T* col = static_cast<const T*>(L.w) + p * L.rows * L.post + q;
      if (vectors_from_uv) {
        const A* u = uv + L.uv_off;
#pragma unroll 4
        for (int64_t r = chunk * L.b_chunk_rows + g; r < r_end; r += groups) {
          sum += static_cast<A>(col[r * L.post]) * u[r];
        }
      } else {
        const T* u = static_cast<const T*>(L.u);
#pragma unroll 4
        for (int64_t r = chunk * L.b_chunk_rows + g; r < r_end; r += groups) {
          sum += static_cast<A>(col[r * L.post]) * static_cast<A>(u[r * L.u_stride]);
        }
      }
    }
    col_sums[threadIdx.x] = sum;
    __syncthreads();
    A* part = acc + L.part_off;
    if (g == 0 && c < L.cols) {
      A total = 0;
      for (int k = 0; k < groups; ++k) total += col_sums[k * width + j];
      part[chunk * L.cols + c] = total;
    }
    if (arrive_last(counters + L.ctr_cols + col_block, L.b_chunks)) {
      // This column block's chunks are all stored: add them in chunk order.
      A* t = acc + L.t_off;
      if (g == 0 && c < L.cols) {
        A total = 0;
        for (int64_t k = 0; k < L.b_chunks; ++k) total += load_global(part + k * L.cols + c);
        t[c] = total;
      }
      if (arrive_last(counters + L.ctr_b, L.b_col_blocks)) {
        finish_cols<T, A>(L, l, t, sigmas, uv, eps, write_sigma);
      }
    }
    __syncthreads();  // col_sums is reused by the next item
  }
}

// The per-layer tiling of launches A and B, and where each layer's scratch lives. Items are
// numbered per chunk (launch_utils.h); counters, accumulators and uv per call.
struct PowerPlan {
  std::vector<PowerLayer> layers;
  int64_t a_items = 0, b_items = 0;  // in the current chunk
  int64_t counters = 0, acc_elems = 0, uv_elems = 0;

  void add(const void* w, void* u, int64_t u_stride, void* v, int64_t v_stride, MatrixView m) {
    if (starts_chunk(layers.size())) a_items = b_items = 0;
    PowerLayer L{};
    L.w = w;
    L.u = u;
    L.v = v;
    L.u_stride = u_stride;
    L.v_stride = v_stride;
    L.pre = m.pre;
    L.rows = m.rows;
    L.post = m.post;
    L.cols = m.cols;
    // Every layer owns at least one item of each launch, even an empty one: its last block
    // writes sigma = 0 and u, v = normalize(0) = 0.
    L.a_tpr = 4;
    while (L.a_tpr < kThreads && L.a_tpr * kRowElemsPerThread < m.cols) L.a_tpr *= 2;
    L.a_begin = a_items;
    L.a_items = std::max<int64_t>(1, ceil_div(m.rows, kThreads / L.a_tpr));
    a_items += L.a_items;
    L.b_width = 32;
    while (L.b_width < kThreads && L.b_width < m.cols) L.b_width *= 2;
    L.b_chunk_rows = kColItemElems / L.b_width;  // >= kThreads / b_width row groups
    L.b_col_blocks = std::max<int64_t>(1, ceil_div(m.cols, L.b_width));
    L.b_chunks = std::max<int64_t>(1, ceil_div(m.rows, L.b_chunk_rows));
    L.b_begin = b_items;
    L.b_items = L.b_col_blocks * L.b_chunks;
    b_items += L.b_items;
    L.s_off = acc_elems;
    L.t_off = L.s_off + m.rows;
    L.part_off = L.t_off + m.cols;
    acc_elems = L.part_off + L.b_chunks * m.cols;
    L.uv_off = uv_elems;
    uv_elems += m.rows + m.cols;
    L.ctr_a = counters;
    L.ctr_b = counters + 1;
    L.ctr_cols = counters + 2;
    counters += 2 + L.b_col_blocks;
    layers.push_back(L);
  }
};

std::tuple<at::Tensor, at::Tensor> power_iteration_cuda(
    at::TensorList weights, at::TensorList us, at::TensorList vs, c10::SymIntArrayRef dims,
    bool u_first, c10::SymInt n_power_iterations, double eps, bool training) {
  const char* op = "sn_cuda::power_iteration";
  check_first(op, weights, "weights");
  const at::Device device = weights[0].device();
  const at::ScalarType dtype = weights[0].scalar_type();
  const size_t n = weights.size();
  TORCH_CHECK(us.size() == n, op, ": us has ", us.size(), " tensors but weights has ", n);
  TORCH_CHECK(vs.size() == n, op, ": vs has ", vs.size(), " tensors but weights has ", n);
  check_list(op, weights, "weights", device, dtype, "weights[0]");
  check_list(op, us, "us", device, dtype, "weights[0]");
  check_list(op, vs, "vs", device, dtype, "weights[0]");
  const std::vector<int64_t> wrapped = checked_dims(op, weights, dims, "weights");
  const int64_t iterations = n_power_iterations.expect_int();
  c10::DeviceGuard guard(device);

  // The kernels address a weight's contiguous storage as (pre, rows, post). A non-contiguous
  // weight (a transposed view, channels_last) is made contiguous first; the usual contiguous
  // weight, including a slice at any storage offset, is read in place.
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(n);
  PowerPlan plan;
  for (size_t i = 0; i < n; ++i) {
    contiguous.push_back(weights[i].contiguous());
    const MatrixView m = matrix_view(weights[i].sizes(), wrapped[i]);
    TORCH_CHECK(
        us[i].dim() == 1 && us[i].numel() == m.rows, op, ": us[", i, "] must be a vector of ",
        m.rows, " elements (weights[", i, "].shape[", wrapped[i], "]), got shape ", us[i].sizes());
    TORCH_CHECK(
        vs[i].dim() == 1 && vs[i].numel() == m.cols, op, ": vs[", i, "] must be a vector of ",
        m.cols, " elements (weights[", i, "].numel() / shape[", wrapped[i], "]), got shape ",
        vs[i].sizes());
    plan.add(
        contiguous.back().const_data_ptr(), us[i].data_ptr(), us[i].stride(0), vs[i].data_ptr(),
        vs[i].stride(0), m);
  }
  check_vectors_disjoint(op, weights, us, vs);

  const at::ScalarType acc = acc_dtype(dtype);
  const auto acc_options = at::TensorOptions().dtype(acc).device(device);
  at::Tensor sigmas = at::empty({static_cast<int64_t>(n)}, acc_options);
  at::Tensor uv = at::empty({plan.uv_elems}, acc_options);
  const Stream stream = current_stream();
  const Scratch scratch = make_scratch(
      plan.counters, plan.acc_elems * static_cast<int64_t>(c10::elementSize(acc)), device, stream);
  const bool iterate = training && iterations > 0;  // else sigma = u . W v from the buffers

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sn_cuda::power_iteration", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* acc_buf = static_cast<acc_t*>(scratch.acc);
    acc_t* uvp = uv.mutable_data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);
    // Chunks are independent: each runs all its iterations before the next starts.
    for_each_chunk(plan.layers, [&](const auto& chunk, size_t first, size_t count) {
      constexpr int cap = std::decay_t<decltype(chunk)>::kCapacity;
      const PowerLayer& last = chunk.layer[count - 1];
      const int64_t a_items = last.a_begin + last.a_items, b_items = last.b_begin + last.b_items;
      const int num_layers = static_cast<int>(count);
      acc_t* sig = sigmas.mutable_data_ptr<acc_t>() + first;
      // The first launch reads the buffers; every later one the vectors the previous wrote.
      bool from_uv = false;
      auto rows = [&](bool eval, bool write_sigma) {
        launch(matvec_rows_kernel<scalar_t, acc_t, cap>, a_items, stream,
            chunk, num_layers, a_items, acc_buf, scratch.counters, sig, uvp, e, eval, from_uv,
            write_sigma);
        from_uv = true;
      };
      auto cols = [&](bool write_sigma) {
        launch(matvec_cols_kernel<scalar_t, acc_t, cap>, b_items, stream,
            chunk, num_layers, b_items, acc_buf, scratch.counters, sig, uvp, e, from_uv,
            write_sigma);
        from_uv = true;
      };
      if (!iterate) {
        rows(/*eval=*/true, /*write_sigma=*/true);
        return;
      }
      for (int64_t it = 0; it < iterations; ++it) {
        const bool last_iteration = it + 1 == iterations;
        if (u_first) {
          rows(/*eval=*/false, /*write_sigma=*/false);
          cols(/*write_sigma=*/last_iteration);
        } else {
          cols(/*write_sigma=*/false);
          rows(/*eval=*/false, /*write_sigma=*/last_iteration);
        }
      }
    });
  });
  return {sigmas, uv};
}

}  // namespace
}  // namespace sn_cuda

SN_CUDA_KERNELS(m) {
  m.impl("power_iteration", &sn_cuda::power_iteration_cuda);
}
