// sn_cuda::normalize_backward on CUDA: dL/dW for every layer of the call in two launches (per
// chunk of kTableCapacity layers, launch_utils.h).
//
//   launch D (grad_dot_kernel): k_l = <G_l, W_l/sigma_l> - g_l sigma_l. Each item stores the
//     partial dot product of its elements; the last item of a layer adds the layer's partials
//     in item order.
//   launch E (grad_weight_kernel): dL/dW = (G - k_l u_r v_c) / sigma_l elementwise, with u_r and
//     v_c read by the element's (row, column) in the (pre, rows, post) view: the rank-one
//     matrix u v^T is never formed.
//
// G = dL/d(W/sigma), g = dL/dsigma (optional), u, v the snapshot sigma used (uv). All in the
// accumulation type, rounded to G's dtype at the end. The schema is in sn_cuda/schemas.py.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "cuda/device_utils.cuh"
#include "cuda/host_utils.h"
#include "cuda/launch_utils.h"
#include "layer_table.h"

namespace sn_cuda {
namespace {

// The (p, r, q) position of contiguous element e in the (pre, rows, post) view, stepped one
// element at a time after one division (32-bit when the layer is small enough: much cheaper).
struct ElementIndex {
  int64_t p, r, q;
  __device__ ElementIndex(int64_t e, int64_t rows, int64_t post, bool small) {
    int64_t j;
    if (small) {
      const uint32_t j32 = static_cast<uint32_t>(e) / static_cast<uint32_t>(post);
      const uint32_t p32 = j32 / static_cast<uint32_t>(rows);
      j = j32;
      p = p32;
    } else {
      j = e / post;
      p = j / rows;
    }
    q = e - j * post;
    r = j - p * rows;
  }
  __device__ void next(int64_t rows, int64_t post) {
    if (++q == post) {
      q = 0;
      if (++r == rows) {
        r = 0;
        ++p;
      }
    }
  }
};

// Launch D: per-layer k = <G, W/sigma> - g sigma. `partials` starts at the chunk's first
// item, the per-layer arrays at its first layer.
template <typename T, typename A, int Cap>
__global__ void __launch_bounds__(kThreads) grad_dot_kernel(
    const __grid_constant__ LayerTable<ElementLayer, Cap> table, int num_layers,
    int64_t total_items, A* partials, unsigned int* counters, const A* __restrict__ sigmas,
    const A* __restrict__ grad_sigmas, A* coefs) {
  constexpr int kVec = vector_elems(sizeof(T));
  constexpr int64_t kItem = elementwise_item_elems(sizeof(T));
  using V = Pack<T, kVec>;
  for (int64_t item = blockIdx.x; item < total_items; item += gridDim.x) {
    const int l = find_layer(num_layers, item, [&](int i) { return table.layer[i].begin; });
    const ElementLayer& L = table.layer[l];
    const T* g = static_cast<const T*>(L.in);
    const T* w = static_cast<const T*>(L.in2);
    const int64_t base = (item - L.begin) * kItem + int64_t{threadIdx.x} * kVec;
    // All of this thread's vector loads are issued before the arithmetic.
    V gx[kElementUnroll], wx[kElementUnroll];
    load_item_packs(g, L.aligned, L.numel, base, gx);
    load_item_packs(w, L.aligned, L.numel, base, wx);
    A part = 0;
#pragma unroll
    for (int k = 0; k < kElementUnroll; ++k) {
      const int64_t e = base + int64_t{k} * kThreads * kVec;
      if (L.aligned && e + kVec <= L.numel) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) part += static_cast<A>(gx[k].val[i]) * static_cast<A>(wx[k].val[i]);
      } else {  // misaligned layer or the layer's tail: element by element
        for (int i = 0; i < kVec && e + i < L.numel; ++i) {
          part += static_cast<A>(g[e + i]) * static_cast<A>(w[e + i]);
        }
      }
    }
    const A total = block_sum(part);
    if (threadIdx.x == 0) partials[item] = total;
    if (arrive_last(counters + l, L.items)) {
      A sum = 0;
      for (int64_t i = threadIdx.x; i < L.items; i += kThreads) {
        sum += load_global(partials + L.begin + i);
      }
      const A dot = block_sum(sum);
      if (threadIdx.x == 0) {
        const A gs = grad_sigmas != nullptr ? grad_sigmas[l] : A(0);
        coefs[l] = dot - gs * sigmas[l];
      }
    }
  }
}

// Launch E: dL/dW = (G - k u_r v_c) / sigma. The per-layer arrays start at the chunk's first
// layer; `uv` is the whole call's (the table's uv_off index it).
template <typename T, typename A, int Cap>
__global__ void __launch_bounds__(kThreads) grad_weight_kernel(
    const __grid_constant__ LayerTable<ElementLayer, Cap> table, int num_layers,
    int64_t total_items, const A* __restrict__ uv, const A* __restrict__ sigmas, const A* coefs) {
  constexpr int kVec = vector_elems(sizeof(T));
  constexpr int64_t kItem = elementwise_item_elems(sizeof(T));
  using V = Pack<T, kVec>;
  for (int64_t item = blockIdx.x; item < total_items; item += gridDim.x) {
    const int l = find_layer(num_layers, item, [&](int i) { return table.layer[i].begin; });
    const ElementLayer& L = table.layer[l];
    const T* g = static_cast<const T*>(L.in);
    T* out = static_cast<T*>(L.out);
    const A* u = uv + L.uv_off;
    const A* v = u + L.rows;
    const A coef = coefs[l];  // written by launch D
    const A sigma = sigmas[l];
    const bool small = L.numel <= int64_t{0xffffffff};
    const int64_t base = (item - L.begin) * kItem + int64_t{threadIdx.x} * kVec;
    // All of this thread's vector loads of G are issued before its first store.
    V gx[kElementUnroll];
    load_item_packs(g, L.aligned, L.numel, base, gx);
#pragma unroll
    for (int k = 0; k < kElementUnroll; ++k) {
      const int64_t e = base + int64_t{k} * kThreads * kVec;
      if (e >= L.numel) continue;
      ElementIndex idx(e, L.rows, L.post, small);
      if (L.aligned && e + kVec <= L.numel) {
        V y;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const A rank_one = u[idx.r] * v[idx.p * L.post + idx.q];
          y.val[i] = static_cast<T>((static_cast<A>(gx[k].val[i]) - coef * rank_one) / sigma);
          idx.next(L.rows, L.post);
        }
        store_pack(out + e, y);
      } else {  // misaligned layer or the layer's tail: element by element
        for (int i = 0; i < kVec && e + i < L.numel; ++i) {
          const A rank_one = u[idx.r] * v[idx.p * L.post + idx.q];
          out[e + i] = static_cast<T>((static_cast<A>(g[e + i]) - coef * rank_one) / sigma);
          idx.next(L.rows, L.post);
        }
      }
    }
  }
}

std::vector<at::Tensor> normalize_backward_cuda(
    at::TensorList grads, const std::optional<at::Tensor>& grad_sigmas, at::TensorList w_sn,
    const at::Tensor& sigmas, const at::Tensor& uv, c10::SymIntArrayRef dims) {
  const char* op = "sn_cuda::normalize_backward";
  check_first(op, w_sn, "w_sn");
  const at::Device device = w_sn[0].device();
  const at::ScalarType dtype = w_sn[0].scalar_type();
  const at::ScalarType acc = acc_dtype(dtype);
  const int64_t n = static_cast<int64_t>(w_sn.size());
  TORCH_CHECK(
      static_cast<int64_t>(grads.size()) == n, op, ": grads has ", grads.size(),
      " tensors but w_sn has ", n);
  check_list(op, w_sn, "w_sn", device, dtype, "w_sn[0]");
  check_list(op, grads, "grads", device, dtype, "w_sn[0]");
  const std::vector<int64_t> wrapped = checked_dims(op, w_sn, dims, "w_sn");
  check_acc_vector(op, sigmas, "sigmas", n, device, acc);
  const bool has_grad_sigmas = grad_sigmas.has_value() && grad_sigmas->defined();
  if (has_grad_sigmas) check_acc_vector(op, *grad_sigmas, "grad_sigmas", n, device, acc);
  c10::DeviceGuard guard(device);

  // Non-contiguous inputs (an expanded gradient from .sum(), say) are made contiguous first:
  // the flat loop reads contiguous storage, at any storage offset.
  std::vector<at::Tensor> gs, ws, outputs;
  ElementPlan plan;
  const int elem = static_cast<int>(c10::elementSize(dtype));
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(
        grads[i].sizes() == w_sn[i].sizes(), op, ": grads[", i, "] has shape ", grads[i].sizes(),
        " but w_sn[", i, "] has shape ", w_sn[i].sizes());
    gs.push_back(grads[i].contiguous());
    ws.push_back(w_sn[i].contiguous());
    outputs.push_back(at::empty(w_sn[i].sizes(), grads[i].options()));
    plan.add(gs.back().const_data_ptr(), ws.back().const_data_ptr(),
        outputs.back().mutable_data_ptr(), w_sn[i].numel(), elem,
        matrix_view(w_sn[i].sizes(), wrapped[i]));
  }
  const int64_t total_items = plan.total_items;
  check_acc_vector(op, uv, "uv", plan.uv_elems, device, acc);
  const at::Tensor sig = sigmas.contiguous();
  const at::Tensor uvc = uv.contiguous();
  const at::Tensor gsig = has_grad_sigmas ? grad_sigmas->contiguous() : at::Tensor();

  // Scratch accumulators: one partial per item, then one coefficient per layer.
  const Stream stream = current_stream();
  const int64_t acc_size = static_cast<int64_t>(c10::elementSize(acc));
  const Scratch scratch =
      make_scratch(/*num_counters=*/n, (total_items + n) * acc_size, device, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sn_cuda::normalize_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* partials = static_cast<acc_t*>(scratch.acc);
    acc_t* coefs = partials + total_items;
    const acc_t* sp = sig.const_data_ptr<acc_t>();
    const acc_t* gsp = has_grad_sigmas ? gsig.const_data_ptr<acc_t>() : nullptr;
    for_each_chunk(plan.layers, [&](const auto& chunk, size_t first, size_t count) {
      constexpr int cap = std::decay_t<decltype(chunk)>::kCapacity;
      const ElementLayer& last = chunk.layer[count - 1];
      const int64_t chunk_items = last.begin + last.items;
      launch(grad_dot_kernel<scalar_t, acc_t, cap>, chunk_items, stream,
          chunk, static_cast<int>(count), chunk_items, partials, scratch.counters + first,
          sp + first, gsp != nullptr ? gsp + first : nullptr, coefs + first);
      launch(grad_weight_kernel<scalar_t, acc_t, cap>, chunk_items, stream,
          chunk, static_cast<int>(count), chunk_items, uvc.const_data_ptr<acc_t>(), sp + first,
          coefs + first);
      partials += chunk_items;
    });
  });
  return outputs;
}

}  // namespace
}  // namespace sn_cuda

SN_CUDA_KERNELS(m) {
  m.impl("normalize_backward", &sn_cuda::normalize_backward_cuda);
}
