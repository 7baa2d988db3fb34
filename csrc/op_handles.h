// Typed handles of the sn_cuda ops, for C++ code that calls them through the dispatcher
// (csrc/autograd.cpp, csrc/spectral_norm.cpp). Looked up on first use: the schemas are defined
// by sn_cuda/ops.py, after this library's static initializers have run.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace sn_cuda {

inline const auto& power_iteration_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sn_cuda::power_iteration", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              at::TensorList, at::TensorList, at::TensorList, c10::SymIntArrayRef, bool,
              c10::SymInt, double, bool)>();
  return op;
}

inline const auto& normalize_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sn_cuda::normalize", "")
          .typed<std::tuple<std::vector<at::Tensor>, at::Tensor>(
              at::TensorList, const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef)>();
  return op;
}

inline const auto& normalize_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sn_cuda::normalize_backward", "")
          .typed<std::vector<at::Tensor>(
              at::TensorList, const std::optional<at::Tensor>&, at::TensorList, const at::Tensor&,
              const at::Tensor&, c10::SymIntArrayRef)>();
  return op;
}

}  // namespace sn_cuda
