// Host-side helpers shared by the three ops and their autograd: argument checks and the
// (pre, rows, post) view of a weight. (How a call reaches the kernels: cuda/launch_utils.h.)
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/Exception.h>

namespace sn_cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// float64 weights accumulate in float64, every other dtype in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A weight as the matrix power iteration runs on: rows = shape[dim], cols = pre * post.
struct MatrixView {
  int64_t pre = 1, rows = 1, post = 1, cols = 1;
};

inline MatrixView matrix_view(at::IntArrayRef sizes, int64_t dim) {
  MatrixView m;
  for (int64_t i = 0; i < dim; ++i) m.pre *= sizes[i];
  m.rows = sizes[dim];
  for (int64_t i = dim + 1; i < static_cast<int64_t>(sizes.size()); ++i) m.post *= sizes[i];
  m.cols = m.pre * m.post;
  return m;
}

// dims[i] checked against weights[i] and wrapped to [0, ndim).
inline std::vector<int64_t> checked_dims(
    const char* op, at::TensorList weights, c10::SymIntArrayRef dims, const char* weights_name) {
  TORCH_CHECK(
      dims.size() == weights.size(), op, ": dims has ", dims.size(), " entries but ", weights_name,
      " has ", weights.size());
  std::vector<int64_t> out(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) {
    const int64_t ndim = weights[i].dim();
    TORCH_CHECK(ndim >= 1, op, ": ", weights_name, "[", i, "] must have at least one dimension");
    const int64_t d = dims[i].expect_int();
    TORCH_CHECK(
        d >= -ndim && d < ndim, op, ": dims[", i, "] = ", d, " is out of range for ",
        weights_name, "[", i, "] with ", ndim, " dimensions");
    out[i] = d < 0 ? d + ndim : d;
  }
  return out;
}

// Every tensor of the list defined, on `device`, of dtype `dtype`.
inline void check_list(
    const char* op, at::TensorList tensors, const char* name, const at::Device& device,
    at::ScalarType dtype) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(
        t.device() == device, op, ": all tensors must be on one CUDA device, but ", name, "[", i,
        "] is on ", t.device(), " and the first weight on ", device);
    TORCH_CHECK(
        t.scalar_type() == dtype, op, ": all tensors must share one dtype, but ", name, "[", i,
        "] is ", t.scalar_type(), " and the first weight ", dtype);
  }
}

// The device type the kernels run on: CUDA, or the CPU in the emulated build (tests/cuda_emu).
#ifdef SN_CUDA_EMULATE
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
#endif

// The first tensor of a non-empty list: a CUDA tensor of a floating dtype the kernels run.
inline void check_first(const char* op, at::TensorList tensors, const char* name) {
  TORCH_CHECK(!tensors.empty(), op, ": ", name, " must hold at least one tensor");
  const at::Tensor& t = tensors[0];
  TORCH_CHECK(
      t.defined() && t.device().type() == kKernelDevice, op, ": ", name, "[0] must be a ",
      c10::DeviceTypeName(kKernelDevice), " tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
      op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
}

// A 1-D vector of `n` accumulator values on `device` (sigmas, grad_sigmas, uv).
inline void check_acc_vector(
    const char* op, const at::Tensor& t, const char* name, int64_t n, const at::Device& device,
    at::ScalarType acc) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(
      t.dim() == 1 && t.numel() == n, op, ": ", name, " must be a vector of ", n,
      " elements, got shape ", t.sizes());
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace sn_cuda
