// sn_cuda::normalize on CUDA: W_l / sigma_l for every layer of the call in one launch (launch
// C; one per chunk of kTableCapacity layers, launch_utils.h), plus the copy of sigma that
// autograd differentiates, made by the same launch.
//
// A flat loop over the contiguous elements of every layer, in items of a fixed number of
// elements (an item never spans two layers), 16-byte loads and stores where the layer's
// pointers allow. The quotient is taken in the accumulation type and rounded once to the
// weight dtype, as the reference's `(w.to(acc) / sigma).to(w.dtype)`. The schema is in
// sn_cuda/schemas.py.

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

// `sigmas` and `sigmas_out` start at the chunk's first layer.
template <typename T, typename A, int Cap>
__global__ void __launch_bounds__(kThreads) divide_kernel(
    const __grid_constant__ LayerTable<ElementLayer, Cap> table, int num_layers,
    int64_t total_items, const A* __restrict__ sigmas, A* __restrict__ sigmas_out) {
  constexpr int kVec = vector_elems(sizeof(T));
  constexpr int64_t kItem = elementwise_item_elems(sizeof(T));
  using V = Pack<T, kVec>;
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < num_layers; i += kThreads) sigmas_out[i] = sigmas[i];
  }
  for (int64_t item = blockIdx.x; item < total_items; item += gridDim.x) {
    const int l = find_layer(num_layers, item, [&](int i) { return table.layer[i].begin; });
    const ElementLayer& L = table.layer[l];
    const T* in = static_cast<const T*>(L.in);
    T* out = static_cast<T*>(L.out);
    const A sigma = sigmas[l];
    const int64_t base = (item - L.begin) * kItem + int64_t{threadIdx.x} * kVec;
    // All of this thread's vector loads are issued before its first store.
    V x[kElementUnroll];
    load_item_packs(in, L.aligned, L.numel, base, x);
#pragma unroll
    for (int k = 0; k < kElementUnroll; ++k) {
      const int64_t e = base + int64_t{k} * kThreads * kVec;
      if (L.aligned && e + kVec <= L.numel) {
        V y;
#pragma unroll
        for (int i = 0; i < kVec; ++i) y.val[i] = static_cast<T>(static_cast<A>(x[k].val[i]) / sigma);
        store_pack(out + e, y);
      } else {  // misaligned layer or the layer's tail: element by element
        for (int i = 0; i < kVec && e + i < L.numel; ++i) {
          out[e + i] = static_cast<T>(static_cast<A>(in[e + i]) / sigma);
        }
      }
    }
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor> normalize_cuda(
    at::TensorList weights, const at::Tensor& sigmas, const at::Tensor& uv,
    c10::SymIntArrayRef dims) {
  const char* op = "sn_cuda::normalize";
  check_first(op, weights, "weights");
  const at::Device device = weights[0].device();
  const at::ScalarType dtype = weights[0].scalar_type();
  const at::ScalarType acc = acc_dtype(dtype);
  const int64_t n = static_cast<int64_t>(weights.size());
  check_list(op, weights, "weights", device, dtype, "weights[0]");
  const std::vector<int64_t> wrapped = checked_dims(op, weights, dims, "weights");
  check_acc_vector(op, sigmas, "sigmas", n, device, acc);
  c10::DeviceGuard guard(device);

  const at::Tensor sig = sigmas.contiguous();
  // A non-contiguous weight is made contiguous first (the flat loop reads contiguous storage);
  // a contiguous one, at any storage offset, is read in place (vector loads only if aligned).
  std::vector<at::Tensor> inputs, outputs;
  ElementPlan plan;
  const int elem = static_cast<int>(c10::elementSize(dtype));
  for (int64_t i = 0; i < n; ++i) {
    inputs.push_back(weights[i].contiguous());
    outputs.push_back(at::empty(weights[i].sizes(), weights[i].options()));
    plan.add(inputs.back().const_data_ptr(), nullptr, outputs.back().mutable_data_ptr(),
        weights[i].numel(), elem, matrix_view(weights[i].sizes(), wrapped[i]));
  }
  check_acc_vector(op, uv, "uv", plan.uv_elems, device, acc);  // unused here; the backward's input
  at::Tensor sigmas_out = at::empty({n}, sig.options());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sn_cuda::normalize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_chunk(plan.layers, [&](const auto& chunk, size_t first, size_t count) {
      constexpr int cap = std::decay_t<decltype(chunk)>::kCapacity;
      const ElementLayer& last = chunk.layer[count - 1];
      const int64_t chunk_items = last.begin + last.items;
      launch(divide_kernel<scalar_t, acc_t, cap>, chunk_items, stream,
          chunk, static_cast<int>(count), chunk_items, sig.const_data_ptr<acc_t>() + first,
          sigmas_out.mutable_data_ptr<acc_t>() + first);
    });
  });
  return {outputs, sigmas_out};
}

}  // namespace
}  // namespace sn_cuda

SN_CUDA_KERNELS(m) {
  m.impl("normalize", &sn_cuda::normalize_cuda);
}
