// Autograd of sn_cuda::normalize and of sn_cuda::power_iteration (none), and the in-place
// bookkeeping of power_iteration, in C++ (TORCH_LIBRARY_IMPL for the Autograd and
// ADInplaceOrView keys, any device).
//
// Why C++: these kernels run on every forward of every batched model, and their Python
// versions (a torch.autograd.Function, a Python ADInplaceOrView kernel) cost host time that
// grows with the layer count; with the GPU work of a whole SN step in a few launches, host
// time is what is left (bench/dispatch_floor.py measures it with the kernels taken out).
// When the extension is not loaded, sn_cuda/ops.py registers its Python ADInplaceOrView kernel
// and takes the pure-torch path for W/σ instead of this op.
//
// The math is in sn_cuda/ops.py's docstring: ∂L/∂W = (G − (⟨G, W/σ⟩ − g σ) u vᵀ) / σ, the
// gradient of W/σ(W) with σ(W) = u·W v for the constants u, v that σ used.
#include <ATen/TensorOperators.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cuda/host_utils.h"
#include "op_handles.h"

namespace sn_cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ∂L/∂W as a differentiable expression in plain ATen ops, with σ recomputed from the weights
// so that second derivatives reach W (create_graph=True: gradient penalties on the weights).
// The first-order backward never comes here: it is one normalize_backward call.
variable_list differentiable_backward(
    const variable_list& grads, const at::Tensor& grad_sigmas, const variable_list& weights,
    const at::Tensor& uv, const std::vector<c10::SymInt>& dims) {
  variable_list out;
  out.reserve(weights.size());
  int64_t offset = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor w = weights[i].to(uv.scalar_type());
    const int64_t dim = c10::maybe_wrap_dim(dims[i].guard_int(__FILE__, __LINE__), w.dim());
    const MatrixView m = matrix_view(w.sizes(), dim);  // cols is right for rows == 0 too
    const int64_t rows = m.rows, cols = m.cols;
    const at::Tensor moved = w.movedim(dim, 0);  // the matrix weight_matrix() builds, as a view
    const at::Tensor u = uv.narrow(0, offset, rows);
    const at::Tensor v = uv.narrow(0, offset + rows, cols);
    offset += rows + cols;
    const at::Tensor sigma = at::dot(u, at::mv(moved.reshape({rows, cols}), v));
    const at::Tensor g = grads[i].to(uv.scalar_type());
    at::Tensor coeff = (g * (w / sigma)).sum();
    if (grad_sigmas.defined()) {
      coeff = coeff - grad_sigmas.select(0, static_cast<int64_t>(i)) * sigma;
    }
    const at::Tensor rank_one = at::outer(u, v).reshape(moved.sizes()).movedim(0, dim);
    out.push_back(((g - coeff * rank_one) / sigma).to(grads[i].scalar_type()));
  }
  return out;
}

struct Normalize : public torch::autograd::Function<Normalize> {
  static variable_list forward(
      AutogradContext* ctx, at::TensorList weights, const at::Tensor& sigmas, const at::Tensor& uv,
      c10::SymIntArrayRef dims) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [w_sn, sigma_out] = normalize_op().call(weights, sigmas, uv, dims);
    ctx->set_materialize_grads(false);
    ctx->saved_data["dims"] = dims;
    variable_list saved;
    saved.reserve(2 + 2 * weights.size());
    saved.push_back(sigmas);
    saved.push_back(uv);
    saved.insert(saved.end(), w_sn.begin(), w_sn.end());
    saved.insert(saved.end(), weights.begin(), weights.end());  // only for create_graph
    ctx->save_for_backward(saved);
    // A frozen layer (its weight needs no gradient: FreezeD, D during G's step) batched with
    // trainable ones: its W/σ is a constant, as from torch's per-layer ops. Unmarked, every
    // output of the group would require grad, and the backward would run through the frozen
    // layers for nothing.
    variable_list constant;
    for (size_t i = 0; i < weights.size(); ++i) {
      if (!weights[i].requires_grad()) constant.push_back(w_sn[i]);
    }
    if (!constant.empty()) ctx->mark_non_differentiable(constant);
    w_sn.push_back(std::move(sigma_out));
    return w_sn;  // W_0/σ_0, ..., W_{n-1}/σ_{n-1}, σ
  }

  // One gradient per forward input: the weights, then sigmas, uv and dims (none of which get
  // one: σ's vectors are constants, as in torch's flavours).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const size_t n = (saved.size() - 2) / 2;
    const at::Tensor& sigmas = saved[0];
    const at::Tensor& uv = saved[1];
    const variable_list w_sn(saved.begin() + 2, saved.begin() + 2 + n);
    const std::vector<c10::SymInt> dims = ctx->saved_data["dims"].toSymIntVector();

    const at::Tensor& grad_sigmas = grad_outputs[n];
    variable_list grads(grad_outputs.begin(), grad_outputs.begin() + n);
    // A layer whose W/σ reached no loss (a head this forward did not use), σ getting none
    // either, gets no gradient, as from torch's per-layer ops: not a zero tensor, which an
    // optimizer's momentum and weight decay, and DDP's unused-parameter detection, would take
    // for one. The fused call still gets zeros for it (one call for the group).
    std::vector<bool> no_gradient(n, false);
    for (size_t i = 0; i < n; ++i) {
      if (!grads[i].defined()) {
        no_gradient[i] = !grad_sigmas.defined();
        grads[i] = at::zeros_like(w_sn[i]);
      }
    }

    variable_list result;
    if (at::GradMode::is_enabled()) {
      const variable_list weights(saved.begin() + 2 + n, saved.end());
      result = differentiable_backward(grads, grad_sigmas, weights, uv, dims);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::optional<at::Tensor> grad_sigmas_opt;
      if (grad_sigmas.defined()) grad_sigmas_opt = grad_sigmas;
      result = normalize_backward_op().call(grads, grad_sigmas_opt, w_sn, sigmas, uv, dims);
    }
    for (size_t i = 0; i < n; ++i) {
      if (no_gradient[i]) result[i] = at::Tensor();
    }
    result.resize(n + 3);  // undefined: no gradient for sigmas, uv, dims
    return result;
  }
};

std::tuple<std::vector<at::Tensor>, at::Tensor> normalize_autograd(
    at::TensorList weights, const at::Tensor& sigmas, const at::Tensor& uv,
    c10::SymIntArrayRef dims) {
  variable_list out = Normalize::apply(weights, sigmas, uv, dims);
  at::Tensor sigma_out = std::move(out.back());
  out.pop_back();
  return {std::move(out), std::move(sigma_out)};
}

// u and v change in place when training: bump their version counters, so that autograd
// refuses a backward through a graph that saved their old values. An inference tensor (made
// under torch.inference_mode) has no version counter, and bumping it throws torch's own
// "Inplace update to inference tensor outside InferenceMode" error, as any in-place op on it
// does outside inference mode (inside it, this kernel is not called). In eval nothing is
// written, nothing is bumped, and inference tensors are read as torch's flavours read them.
std::tuple<at::Tensor, at::Tensor> power_iteration_inplace(
    c10::DispatchKeySet keys, at::TensorList weights, at::TensorList us, at::TensorList vs,
    c10::SymIntArrayRef dims, bool u_first, c10::SymInt n_power_iterations, double eps,
    bool training) {
  if (training && n_power_iterations.guard_int(__FILE__, __LINE__) > 0) {
    for (const at::Tensor& t : us) torch::autograd::impl::bump_version(t);
    for (const at::Tensor& t : vs) torch::autograd::impl::bump_version(t);
  }
  return power_iteration_op().redispatch(
      keys & c10::after_ADInplaceOrView_keyset, weights, us, vs, dims, u_first,
      std::move(n_power_iterations), eps, training);
}

// Power iteration is not differentiable (torch, too, iterates under no_grad): run it below
// autograd, so that nothing it computes records a graph, whatever the grad mode, and its
// outputs never require grad. Without this kernel every call went through autograd's boxed
// "not implemented" fallback, which moves the three tensor lists to and from the dispatcher's
// stack (measured: bench/RESULTS.md).
std::tuple<at::Tensor, at::Tensor> power_iteration_autograd(
    c10::DispatchKeySet keys, at::TensorList weights, at::TensorList us, at::TensorList vs,
    c10::SymIntArrayRef dims, bool u_first, c10::SymInt n_power_iterations, double eps,
    bool training) {
  at::AutoDispatchBelowAutograd below_autograd;
  return power_iteration_op().redispatch(
      keys & c10::after_autograd_keyset, weights, us, vs, dims, u_first,
      std::move(n_power_iterations), eps, training);
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_cuda, Autograd, m) {
  m.impl("normalize", &normalize_autograd);
  m.impl("power_iteration", &power_iteration_autograd);
}

TORCH_LIBRARY_IMPL(sn_cuda, ADInplaceOrView, m) {
  m.impl("power_iteration", &power_iteration_inplace);
}

}  // namespace sn_cuda
