"""The op boundary: sn_cuda's dispatcher ops and their fake kernels.

Four ops live in the ``sn_cuda`` namespace: three with kernels, and ``spectral_norm``, which
calls two of them. They are defined here (schemas: ``sn_cuda/schemas.py``), so that the ops
exist (and torch.compile traces them) whether or not the compiled extension is installed; the
default implementation of each of the three is the pure-torch reference (any device). The extension
(``csrc/``) registers CUDA kernels for them, which the dispatcher prefers for CUDA tensors,
and, for every device, normalize's autograd, power_iteration's (none: it runs below autograd)
and its version bump, in C++ (``csrc/autograd.cpp``).
All layers of one call share one device and one dtype (``sn_cuda.batch`` groups them).

``power_iteration(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, SymInt[] dims, bool u_first,
SymInt n_power_iterations, float eps, bool training) -> (Tensor sigmas, Tensor uv)``
    When ``training``, ``n_power_iterations`` steps on every layer, in place on u and v
    (``u_first``: the parametrization flavour's order; else the hook flavour's). Then
    σ_l = u_l·W_l v_l, taken from the last normalization (no extra pass over W when
    training). ``uv`` is a packed snapshot [u_0, v_0, u_1, v_1, ...] of the vectors σ used,
    for the backward (the buffers may be updated again before it runs). ``sigmas`` and ``uv``
    have the accumulation dtype: float64 for float64 weights, float32 otherwise. No autograd:
    torch, too, runs power iteration under no_grad. Every u and v must have memory of its own
    (not shared with another vector or a weight, not expanded): the CUDA kernels, which would
    race on it, refuse it; the reference updates the layers one after another.

``normalize(Tensor[] weights, Tensor sigmas, Tensor uv, SymInt[] dims) -> (Tensor[], Tensor)``
    W_l/σ_l, and σ as a differentiable output. ``sigmas`` and ``uv`` must be what
    ``power_iteration`` returned for these weights: the gradient is that of W/σ(W) with
    σ(W) = u·W v (u, v constants), as in torch's flavours, not that of W/σ for a free σ.

``normalize_backward(Tensor[] grads, Tensor? grad_sigmas, Tensor[] w_sn, Tensor sigmas,
Tensor uv, SymInt[] dims) -> Tensor[]``
    ∂L/∂W_l = (G_l − (⟨G_l, W_l/σ_l⟩ − g_l σ_l) u_l v_lᵀ) / σ_l, with G = ∂L/∂(W/σ) and
    g = ∂L/∂σ (``SpectralPenalty`` differentiates σ itself).

``spectral_norm(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, SymInt[] dims, bool u_first,
SymInt n_power_iterations, float eps, bool training) -> (Tensor[], Tensor)``
    ``power_iteration`` (no autograd), then ``normalize``: W/σ and σ in one call from Python,
    which parses each tensor list once (csrc/spectral_norm.cpp, CompositeImplicitAutograd: the
    extension's only; it has no implementation without the extension, and is not called then).

The function ``spectral_norm`` at the bottom is what the modules and the batching layer call:
the fused op when the kernels can run the weights (the two ops under torch.compile in
training), the reference (plain torch autograd) otherwise: also inside torch.func transforms,
under torch.jit.trace, and under torch.compile / torch.export in eval mode.
Without the extension, normalize has no autograd and is not called.
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
from torch import Tensor

from . import _extension, reference
from .schemas import SCHEMAS

__all__ = ["spectral_norm", "uses_kernels", "in_functorch_transform", "record_sigma"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_cols(shape: Sequence[int], dim: int) -> tuple[int, int]:
    if dim < 0:  # as the kernels wrap it
        dim += len(shape)
    # math.prod over slices, not a generator: dynamo traces this (compile without the extension).
    return shape[dim], math.prod(shape[:dim]) * math.prod(shape[dim + 1 :])


def _split_uv(uv: Tensor, shapes: Sequence[Sequence[int]], dims: Sequence[int]):
    """The per-layer (u, v) views of the packed ``uv`` snapshot."""
    us, vs, offset = [], [], 0
    for shape, dim in zip(shapes, dims):
        rows, cols = _rows_cols(shape, dim)
        us.append(uv[offset : offset + rows])
        vs.append(uv[offset + rows : offset + rows + cols])
        offset += rows + cols
    return us, vs


def _uv_numel(weights: Sequence[Tensor], dims: Sequence[int]) -> int:
    return sum(sum(_rows_cols(w.shape, d)) for w, d in zip(weights, dims))


# ------------------------------------------------------------------------ definitions
# The ops are defined with torch.library's low-level API rather than torch.library.custom_op:
# custom_op's generic wrappers (pytree over the tensor lists, a Python ADInplaceOrView kernel,
# a generic autograd.Function) add host time on every call that grows with the layer count
# (bench/RESULTS.md: a step's boundary cost went from 363 to 273 µs at 11 layers, 1328 to
# 995 µs at 64, kernels excluded). Here each dispatch key does only what these ops need. The
# schemas (sn_cuda/schemas.py) are the contract with csrc/ (TORCH_LIBRARY_IMPL(sn_cuda, CUDA)).
# (tests/test_kernels_emulated.py defines the same schemas in a test-only namespace.)
_lib = torch.library.Library("sn_cuda", "FRAGMENT")
for _schema in SCHEMAS:
    _lib.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))
power_iteration_op = torch.ops.sn_cuda.power_iteration.default
normalize_op = torch.ops.sn_cuda.normalize.default
normalize_backward_op = torch.ops.sn_cuda.normalize_backward.default
spectral_norm_op = torch.ops.sn_cuda.spectral_norm.default


# ------------------------------------------------------------------ argument checks
def check_layers(op: str, weights, us, vs, dims) -> None:
    """The CUDA kernels' checks of a layer list (csrc/cuda/host_utils.h), with their messages:
    the same bad call fails the same way on every path (RuntimeError, as from TORCH_CHECK),
    where the reference would truncate lists, resize a wrong-sized u in place, or fail deep in
    a reshape."""
    _check_counts(op, weights, dims, us=us, vs=vs)
    device, dtype = weights[0].device, weights[0].dtype
    for i, (w, u, v, d) in enumerate(zip(weights, us, vs, dims)):
        for name, t in (("weights", w), ("us", u), ("vs", v)):
            if t.device != device:
                raise RuntimeError(
                    f"{op}: all tensors must be on one device, but {name}[{i}] is on {t.device} "
                    f"and weights[0] on {device}"
                )
            if t.dtype != dtype:
                raise RuntimeError(
                    f"{op}: all tensors must share one dtype, but {name}[{i}] is "
                    f"{_TYPE_NAMES.get(t.dtype, t.dtype)} and weights[0] "
                    f"{_TYPE_NAMES.get(dtype, dtype)}"
                )
        if w.ndim < 1:
            raise RuntimeError(f"{op}: weights[{i}] must have at least one dimension")
        if isinstance(d, float):
            continue  # torch's flavours take dim=0.0 (and fail on 1.0): the reference, as they do
        if not -w.ndim <= d < w.ndim:
            raise RuntimeError(
                f"{op}: dims[{i}] = {d} is out of range for weights[{i}] with {w.ndim} dimensions"
            )
        rows, cols = _rows_cols(w.shape, d)
        wrapped = d % w.ndim
        if u.ndim != 1 or u.numel() != rows:
            raise RuntimeError(
                f"{op}: us[{i}] must be a vector of {rows} elements (weights[{i}].shape[{wrapped}]), "
                f"got shape {list(u.shape)}"
            )
        if v.ndim != 1 or v.numel() != cols:
            raise RuntimeError(
                f"{op}: vs[{i}] must be a vector of {cols} elements (weights[{i}].numel() / "
                f"shape[{wrapped}]), got shape {list(v.shape)}"
            )


def _check_counts(op: str, weights, dims, name: str = "weights", **lists) -> None:
    """At least one layer, and as many of each list (and of dims) as of ``weights``."""
    n = len(weights)
    if n == 0:
        raise RuntimeError(f"{op}: {name} must hold at least one tensor")
    for other, seq in lists.items():
        if len(seq) != n:
            raise RuntimeError(f"{op}: {other} has {len(seq)} tensors but {name} has {n}")
    if len(dims) != n:
        raise RuntimeError(f"{op}: dims has {len(dims)} entries but {name} has {n}")


def _check_acc_vector(op: str, t: Tensor, name: str, n: int, device, acc) -> None:
    """A 1-D vector of ``n`` accumulator values (sigmas, grad_sigmas, uv), as the kernels check."""
    if t.device != device:
        raise RuntimeError(f"{op}: {name} must be on {device}, got {t.device}")
    if t.dtype != acc:
        raise RuntimeError(f"{op}: {name} must be {_TYPE_NAMES[acc]}, got {_TYPE_NAMES.get(t.dtype, t.dtype)}")
    if t.ndim != 1 or t.numel() != n:
        raise RuntimeError(f"{op}: {name} must be a vector of {n} elements, got shape {list(t.shape)}")


def _check_normalize_inputs(op: str, weights, sigmas, uv, dims, name: str = "weights", **lists) -> None:
    _check_counts(op, weights, dims, name, **lists)
    device, acc = weights[0].device, _acc_dtype(weights[0].dtype)
    _check_acc_vector(op, sigmas, "sigmas", len(weights), device, acc)
    _check_acc_vector(op, uv, "uv", _uv_numel(weights, dims), device, acc)


# c10's names of the dtypes, which the kernels' messages print.
_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


# ---------------------------------------------- reference implementations (every device)
# Registered as CompositeExplicitAutograd: the default for any device; the extension's CUDA
# kernels take precedence for CUDA tensors.
def _power_iteration_reference(weights, us, vs, dims, u_first, n_power_iterations, eps, training):
    check_layers("sn_cuda::power_iteration", weights, us, vs, dims)
    sigmas, snapshot = [], []
    with reference.no_autocast(weights[0].device):
        for weight, u, v, dim in zip(weights, us, vs, dims):
            sigma, u, v = reference.sigma_and_vectors(
                weight, u, v, dim, u_first, n_power_iterations, eps, training
            )
            sigmas.append(sigma)
            snapshot += [u.reshape(-1), v.reshape(-1)]
    return torch.stack(sigmas), torch.cat(snapshot)


def _normalize_reference(weights, sigmas, uv, dims):
    _check_normalize_inputs("sn_cuda::normalize", weights, sigmas, uv, dims)
    # In the accumulation dtype, rounded once (a no-op cast for float32/float64 weights).
    # Contiguous outputs whatever the weights' strides, like the kernels (and the fake kernel).
    w_sn = [
        (w.to(s.dtype) / s).to(w.dtype).contiguous() for w, s in zip(weights, sigmas.unbind(0))
    ]
    return w_sn, sigmas.clone()


def _normalize_backward_reference(grads, grad_sigmas, w_sn, sigmas, uv, dims):
    op = "sn_cuda::normalize_backward"
    _check_normalize_inputs(op, w_sn, sigmas, uv, dims, "w_sn", grads=grads)
    for i, (g, w) in enumerate(zip(grads, w_sn)):
        if g.shape != w.shape:
            raise RuntimeError(
                f"{op}: grads[{i}] has shape {list(g.shape)} but w_sn[{i}] has shape {list(w.shape)}"
            )
    if grad_sigmas is not None:
        _check_acc_vector(op, grad_sigmas, "grad_sigmas", len(w_sn), sigmas.device, sigmas.dtype)
    us, vs = _split_uv(uv, [w.shape for w in w_sn], dims)
    if grad_sigmas is None:
        grad_sigmas = torch.zeros_like(sigmas)
    return reference.spectral_norm_backward(
        grads, grad_sigmas.unbind(0), w_sn, sigmas.unbind(0), us, vs, dims
    )


_lib.impl("power_iteration", _power_iteration_reference, "CompositeExplicitAutograd")
_lib.impl("normalize", _normalize_reference, "CompositeExplicitAutograd")
_lib.impl("normalize_backward", _normalize_backward_reference, "CompositeExplicitAutograd")


# ------------------------------------------------------------------------ fake kernels
@torch.library.register_fake("sn_cuda::power_iteration", lib=_lib)
def _(weights, us, vs, dims, u_first, n_power_iterations, eps, training):
    acc = _acc_dtype(weights[0].dtype)
    device = weights[0].device
    sigmas = torch.empty(len(weights), dtype=acc, device=device)
    return sigmas, torch.empty(_uv_numel(weights, dims), dtype=acc, device=device)


@torch.library.register_fake("sn_cuda::normalize", lib=_lib)
def _(weights, sigmas, uv, dims):
    return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights], torch.empty_like(sigmas)


@torch.library.register_fake("sn_cuda::normalize_backward", lib=_lib)
def _(grads, grad_sigmas, w_sn, sigmas, uv, dims):
    return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in w_sn]


# ------------------------------------------------------- in-place bookkeeping, autograd
# The compiled extension registers both in C++ (csrc/autograd.cpp): an ADInplaceOrView kernel
# for power_iteration and normalize's autograd, whose Python versions cost measured host time
# on every forward (bench/RESULTS.md). Without them, normalize is not called (W/σ is taken in
# plain torch ops, see spectral_norm) and only the version bump is needed, registered here.
def _power_iteration_inplace(keyset, weights, us, vs, dims, u_first, n_power_iterations, eps, training):
    # u and v change in place when training: bump their version counters, so that autograd
    # refuses a backward through a graph that saved their old values (as csrc/autograd.cpp).
    if training and n_power_iterations > 0:
        torch.autograd.graph.increment_version(us)
        torch.autograd.graph.increment_version(vs)
    return power_iteration_op.redispatch(
        keyset & torch._C._after_ADInplaceOrView_keyset,
        weights, us, vs, dims, u_first, n_power_iterations, eps, training,
    )


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sn_cuda::{op}", key)


if not _has_kernel("power_iteration", "ADInplaceOrView"):
    _lib.impl("power_iteration", _power_iteration_inplace, "ADInplaceOrView", with_keyset=True)
_NORMALIZE_HAS_AUTOGRAD = _has_kernel("normalize", "Autograd")
_peek_functorch = torch._C._functorch.peek_interpreter_stack
_FunctorchInterpreter = torch._C._functorch.CInterpreter


def in_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is running, eager or
    traced by torch.compile. (isinstance, not ``is None``: dynamo, torch 2.14, takes the None
    that peek_interpreter_stack returns outside transforms for an object.)"""
    return isinstance(_peek_functorch(), _FunctorchInterpreter)


def record_sigma(owner, sigmas: Tensor, index: int) -> None:
    """``owner.last_sigma = (σ's, index)``, what ``sn_cuda.sigmas`` reads; not inside a
    torch.func transform, whose tensors are wrappers that mean nothing outside it (and that
    torch.compile cannot return from a transform it traces as module state)."""
    if not in_functorch_transform():
        owner.__dict__["last_sigma"] = (sigmas.detach(), index)
_jit_tracing = torch._C._is_tracing
_forward_ad = torch.autograd.forward_ad  # its _current_level: -1 outside dual_level()


# ------------------------------------------------------------------- what modules call
def uses_kernels(weight: Tensor) -> bool:
    """True when ``weight``'s spectral norm runs on the compiled CUDA kernels."""
    return _extension.LOADED and weight.is_cuda and weight.dtype in _KERNEL_DTYPES


def spectral_norm(
    weights: Sequence[Tensor],
    us: Sequence[Tensor],
    vs: Sequence[Tensor],
    dims: Sequence[int],
    u_first: bool,
    n_power_iterations: int,
    eps: float,
    training: bool,
) -> tuple[list[Tensor], Tensor]:
    """W/σ and σ for layers of 2 or more dims sharing one device and dtype.

    The fused ops when the kernels can run them, the pure-torch reference otherwise (and in the
    traced and transformed cases said below). Returns
    ``(w_sn, sigmas)``: the list of W/σ and a 1-D tensor of the σ's, both differentiable with
    respect to the weights.
    """
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Under torch.compile and torch.export, a training call traces the ops on every device
        # (power_iteration's default implementation is the reference): traced inline, the
        # reference's in-place update of u, v lets inductor's partitioner recompute σ's vectors
        # in the backward from the already-updated buffers (wrong weight gradients in the hook
        # flavour's order; torch's own hook flavour has the same problem, torch 2.14). The op
        # keeps the update opaque to it. An eval call updates nothing: plain torch ops, which
        # inductor fuses and every exporter (ONNX, AOTInductor) knows without sn_cuda.
        # Inside a traced torch.func transform, the reference, as in eager (below).
        kernel_path = (
            training and weights[0].dtype in _KERNEL_DTYPES and not in_functorch_transform()
        )
    else:
        # The reference serves inside a torch.func transform (grad, vjp, jacrev, vmap), which
        # cannot differentiate normalize's autograd, a C++ torch::autograd::Function, and
        # under torch.jit.trace, whose graph then runs (and exports) without sn_cuda.
        kernel_path = (
            len(weights) > 0  # none: check_layers says so below
            and uses_kernels(weights[0]) and not in_functorch_transform() and not _jit_tracing()
            and _forward_ad._current_level < 0  # nor forward-mode AD: the C++ autograd has no jvp
        )
    if kernel_path:
        # torch's flavours take any dim equal to 0 (0.0, False: they permute only when
        # dim != 0), the schemas an int.
        weights, dims = list(weights), [0 if d == 0 else d for d in dims]
        # range() in the reference raises this TypeError for a float; the schema's would differ.
        n_power_iterations = int(operator.index(n_power_iterations))
        if not compiling:  # uses_kernels: the extension, hence the fused op, is loaded
            return spectral_norm_op(
                weights, list(us), list(vs), dims, u_first, n_power_iterations, float(eps), training
            )
        # torch.compile traces the two ops (the fused one has no implementation without the
        # extension, and would only be decomposed into them).
        with torch.no_grad():  # torch, too, iterates under no_grad
            sigmas, uv = power_iteration_op(
                weights, list(us), list(vs), dims, u_first, n_power_iterations, float(eps), training
            )
        if _NORMALIZE_HAS_AUTOGRAD:
            return normalize_op(weights, sigmas, uv, dims)
        # normalize's autograd is compiled code: without it, W/σ from the snapshot in torch ops.
        us, vs = _split_uv(uv, [w.shape for w in weights], dims)
        training = False  # the snapshot holds the vectors σ uses: no further iteration
    elif not compiling:
        check_layers("sn_cuda.ops.spectral_norm", weights, us, vs, dims)
    w_sn, sigmas = reference.spectral_norm(
        weights, us, vs, dims, u_first, n_power_iterations, eps, training
    )
    return w_sn, torch.stack(sigmas)
