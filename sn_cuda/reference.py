"""The pure-torch spectral normalization of a list of layers: CPU fallback and test oracle.

Every op here is the one torch's own flavours run (``torch.mv``, ``F.normalize(..., out=)``,
``torch.vdot``), in the same order, so on the same inputs the results are bit-identical to
``torch.nn.utils.spectral_norm`` (hook flavour) and
``torch.nn.utils.parametrizations.spectral_norm`` (parametrization flavour). The fused CUDA
kernels are tested against these functions.

Conventions shared with the compiled op (``sn_cuda.ops``):

* a weight of any shape is the matrix ``rows = shape[dim]`` by ``cols = numel // rows``;
* ``u_first=True`` is the parametrization flavour's order (u = normalize(W v), then
  v = normalize(Wᴴ u)); ``u_first=False`` is the hook flavour's (v first, then u);
* u and v are updated in place, under no_grad, only when ``training``; the values used for σ
  are clones of the updated ones, so a later call may update the buffers again before the
  backward of an earlier one (``D(real)``, ``D(fake)``, one backward);
* σ = u · (W v) is differentiable with respect to W (u, v are constants), as in torch;
* float16/bfloat16 weights: power iteration, σ and W/σ run in float32 and W/σ is rounded once;
  u and v keep the weight's dtype (checkpoints stay interchangeable). torch runs these in
  half precision, where ``F.normalize`` can underflow to NaN (pytorch#61954);
* autocast does not reach these computations (``torch.mv`` is on its lower-precision list).
  float32/float64 keep torch's exact op sequence, so CPU parity with torch stays bit-exact.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TRANSPOSED_CONVS",
    "default_dim",
    "weight_matrix",
    "power_iteration",
    "sigma_and_vectors",
    "no_autocast",
    "spectral_norm",
    "spectral_norm_backward",
]


# Modules whose weight is laid out (in, out, ...): power iteration runs on dim 1, as in torch.
TRANSPOSED_CONVS = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def default_dim(module: torch.nn.Module) -> int:
    """The dim of ``module.weight`` whose size is the matrix view's rows, as torch picks it."""
    return 1 if isinstance(module, TRANSPOSED_CONVS) else 0


def weight_matrix(weight: Tensor, dim: int) -> Tensor:
    """``weight`` as the (shape[dim], numel // shape[dim]) matrix power iteration runs on.

    The same view torch builds (dim moved to the front, the rest flattened in order), which is
    the matrix the kernels address in place as (pre, rows, post) without a copy.
    """
    if dim < 0:  # as the kernels wrap it (the modules always pass dim >= 0)
        dim += weight.ndim
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.ndim) if d != dim))
    # Not reshape(rows, -1), which fails when rows == 0; a 1-D weight (the hook flavour
    # accepts one, e.g. a bias) is the (n, 1) matrix, as in torch.
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))


# Weights whose arithmetic runs in float32 (their u, v buffers keep the weight's dtype).
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    # Older torch's dynamo (2.9.1 at least) cannot trace torch._C._is_autocast_available
    # (a fullgraph error); the answer is constant for a device type, so compile bakes it in.
    return torch.amp.is_autocast_available(device_type)


def no_autocast(device: torch.device):
    """A context that turns autocast off on ``device`` (a no-op when it is not on).

    ``torch.mv`` is on CUDA autocast's lower-precision list: under ``torch.autocast`` torch's
    own flavours run power iteration in float16. sn_cuda's arithmetic is the same inside and
    outside autocast (the kernels ignore it too); only what the model does with W/σ is cast.
    """
    if _autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def power_iteration(
    mat: Tensor, u: Tensor, v: Tensor, u_first: bool, n_power_iterations: int, eps: float
) -> tuple[Tensor, Tensor]:
    """``n_power_iterations`` steps of power iteration on ``mat``, updating u and v in place.

    Returns u and v in the accumulation dtype: the buffers themselves for float32/float64;
    for float16/bfloat16 the steps run in float32 on copies (torch's float16
    ``F.normalize`` underflows to NaN, pytorch#61954), the buffers receive the rounded
    vectors and the float32 ones are returned, for σ.
    """
    if mat.dtype in _LOW_PRECISION:
        u_acc, v_acc = u.float(), v.float()
        power_iteration(mat.float(), u_acc, v_acc, u_first, n_power_iterations, eps)
        u.copy_(u_acc)
        v.copy_(v_acc)
        return u_acc, v_acc
    for _ in range(n_power_iterations):
        if u_first:
            F.normalize(torch.mv(mat, v), dim=0, eps=eps, out=u)
            F.normalize(torch.mv(mat.H, u), dim=0, eps=eps, out=v)
        else:
            F.normalize(torch.mv(mat.t(), u), dim=0, eps=eps, out=v)
            F.normalize(torch.mv(mat, v), dim=0, eps=eps, out=u)
    return u, v


def sigma_and_vectors(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, u_first: bool, n_power_iterations: int,
    eps: float, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """σ = u·W v after (when ``training``) power iteration in place on u, v.

    Returns ``(σ, u, v)``, u and v the values σ used, in the accumulation dtype (float32 for
    float16/bfloat16 weights: their power iteration, too, ran in float32; the buffers get the
    vectors rounded), contiguous copies that a later update of the buffers does not reach. σ is
    differentiable with respect to ``weight``.
    """
    mat = weight_matrix(weight, dim)
    if training:
        u, v = power_iteration(mat, u, v, u_first, n_power_iterations, eps)
    if weight.dtype in _LOW_PRECISION:
        mat, u, v = mat.float(), u.float(), v.float()  # differentiable through the upcast
    u = u.clone(memory_format=torch.contiguous_format)
    v = v.clone(memory_format=torch.contiguous_format)
    return torch.vdot(u, torch.mv(mat, v)), u, v


def spectral_norm(
    weights: Sequence[Tensor],
    us: Sequence[Tensor],
    vs: Sequence[Tensor],
    dims: Sequence[int],
    u_first: bool,
    n_power_iterations: int,
    eps: float,
    training: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """W/σ and σ for each layer (weights of 2 or more dims); u, v updated in place if training.

    Returns ``(w_sn, sigmas)``: lists, one entry per layer, differentiable with respect to the
    weights exactly as torch's flavours are.
    """
    w_sn, sigmas = [], []
    for weight, u, v, dim in zip(weights, us, vs, dims):
        with no_autocast(weight.device):
            sigma, _, _ = sigma_and_vectors(
                weight, u, v, dim, u_first, n_power_iterations, eps, training
            )
            if weight.dtype in _LOW_PRECISION:  # W/σ in float32, rounded once
                w_sn.append((weight.float() / sigma).to(weight.dtype))
            else:
                w_sn.append(weight / sigma)
        sigmas.append(sigma)
    return w_sn, sigmas


def spectral_norm_backward(
    grads: Sequence[Tensor],
    grad_sigmas: Sequence[Tensor],
    w_sn: Sequence[Tensor],
    sigmas: Sequence[Tensor],
    us: Sequence[Tensor],
    vs: Sequence[Tensor],
    dims: Sequence[int],
) -> list[Tensor]:
    """∂L/∂W for each layer, from G = ∂L/∂(W/σ) and g = ∂L/∂σ (u, v the values σ used).

    W/σ with σ = u·W v gives ∂L/∂W = (G − (⟨G, W/σ⟩ − g σ) u vᵀ) / σ; the rank-one term is
    formed here for clarity (the kernels never materialize it).
    """
    out = []
    for g, gs, wsn, sigma, u, v, dim in zip(grads, grad_sigmas, w_sn, sigmas, us, vs, dims):
        acc = sigma.dtype
        coeff = (g.to(acc) * wsn.to(acc)).sum() - gs.to(acc) * sigma
        rank_one = torch.outer(u.to(acc), v.to(acc))
        # Back from the (rows, cols) matrix to the weight's shape: undo weight_matrix's view.
        dim = dim + wsn.ndim if dim < 0 else dim
        moved = (wsn.shape[dim],) + tuple(s for i, s in enumerate(wsn.shape) if i != dim)
        rank_one = rank_one.reshape(moved).movedim(0, dim)
        out.append(((g.to(acc) - coeff * rank_one) / sigma).to(g.dtype))
    return out
