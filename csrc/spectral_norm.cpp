// sn_cuda::spectral_norm: power_iteration, then normalize, in one call from Python.
//
// Why: a call from Python into the dispatcher parses every tensor list it is given, and the
// two ops together were given the weights twice, plus the (sigmas, uv) round trip through
// Python. In eager mode with the kernels,
// sn_cuda/ops.py makes this one call instead (bench/dispatch_floor.py measures the saving).
// Registered as CompositeImplicitAutograd: autograd sees the two ops it calls, exactly as when
// Python called them (normalize's C++ autograd; power_iteration's version bump, no autograd).
#include <torch/library.h>

#include "op_handles.h"

namespace sn_cuda {
namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor> spectral_norm(
    at::TensorList weights, at::TensorList us, at::TensorList vs, c10::SymIntArrayRef dims,
    bool u_first, c10::SymInt n_power_iterations, double eps, bool training) {
  // Not differentiable: its Autograd kernel (csrc/autograd.cpp) runs it below autograd.
  const auto [sigmas, uv] = power_iteration_op().call(
      weights, us, vs, dims, u_first, std::move(n_power_iterations), eps, training);
  return normalize_op().call(weights, sigmas, uv, dims);
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_cuda, CompositeImplicitAutograd, m) {
  m.impl("spectral_norm", &spectral_norm);
}

}  // namespace sn_cuda
