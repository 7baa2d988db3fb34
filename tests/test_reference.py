"""sn_cuda.reference, the oracle every kernel is tested against, against torch's own code.

The matrix view, power iteration in both orders and the forward are compared bit for bit
with torch's two flavours; the closed-form backward with torch autograd (float64).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.parametrizations import _SpectralNorm as TorchParametrization

from sn_cuda import reference

_torch_legacy = importlib.import_module("torch.nn.utils.spectral_norm")

SHAPES_DIMS = [((7, 5), 0), ((7, 5), 1), ((6, 2, 3), 0), ((6, 2, 3), 1), ((6, 2, 3), 2), ((4, 3, 3, 2), 1), ((3, 4, 2, 2, 2), 4)]


def _unit(n, dtype=torch.float32):
    return F.normalize(torch.randn(n, dtype=dtype), dim=0)


def _layers(dtype=torch.float32, seed=0):
    """(weights, us, vs, dims) for a mixed list of layers."""
    torch.manual_seed(seed)
    weights, us, vs, dims = [], [], [], []
    for shape, dim in SHAPES_DIMS:
        w = torch.randn(shape, dtype=dtype)
        rows = shape[dim]
        weights.append(w)
        us.append(_unit(rows, dtype))
        vs.append(_unit(w.numel() // rows, dtype))
        dims.append(dim)
    return weights, us, vs, dims


@pytest.mark.parametrize("shape, dim", SHAPES_DIMS)
def test_weight_matrix_is_torchs_view(shape, dim):
    w = torch.randn(shape)
    mat = reference.weight_matrix(w, dim)
    assert torch.equal(mat, TorchParametrization(w, dim=dim)._reshape_weight_to_matrix(w))
    assert torch.equal(mat, _torch_legacy.SpectralNorm(dim=dim).reshape_weight_to_matrix(w))
    # The kernels address it in place: (r, c = p·post + q) is p·rows·post + r·post + q.
    rows, post = shape[dim], math.prod(shape[dim + 1 :])
    flat = w.reshape(-1)
    for r in range(rows):
        for c in range(mat.shape[1]):
            p, q = divmod(c, post)
            assert mat[r, c] == flat[p * rows * post + r * post + q]


@pytest.mark.parametrize("shape, dim", SHAPES_DIMS)
@pytest.mark.parametrize("n", [1, 4])
def test_power_iteration_u_first_is_the_parametrization_flavours(shape, dim, n):
    torch.manual_seed(0)
    w = torch.randn(shape)
    sn = TorchParametrization(w, n_power_iterations=n, dim=dim)
    u, v = sn._u.clone(), sn._v.clone()
    ptrs = u.data_ptr(), v.data_ptr()
    sn._power_method(sn._reshape_weight_to_matrix(w), n)
    reference.power_iteration(reference.weight_matrix(w, dim), u, v, True, n, sn.eps)
    assert (u.data_ptr(), v.data_ptr()) == ptrs
    assert torch.equal(u, sn._u) and torch.equal(v, sn._v)


@pytest.mark.parametrize("shape, dim", SHAPES_DIMS)
@pytest.mark.parametrize("n", [1, 4])
def test_forward_v_first_is_the_hook_flavours(shape, dim, n):
    # torch's hook computes on a module; build one holding the weight and the vectors.
    torch.manual_seed(0)
    w = torch.randn(shape)
    holder = torch.nn.Module()
    holder.weight_orig = torch.nn.Parameter(w.clone())
    rows = shape[dim]
    holder.register_buffer("weight_u", _unit(rows))
    holder.register_buffer("weight_v", _unit(w.numel() // rows))
    u, v = holder.weight_u.clone(), holder.weight_v.clone()
    expected = _torch_legacy.SpectralNorm("weight", n, dim, 1e-12).compute_weight(holder, True)
    w_sn, sigmas = reference.spectral_norm([w], [u], [v], [dim], False, n, 1e-12, True)
    assert torch.equal(w_sn[0], expected)
    assert torch.equal(u, holder.weight_u) and torch.equal(v, holder.weight_v)
    assert torch.equal(w / sigmas[0], w_sn[0])  # the σ returned is the one divided by


@pytest.mark.parametrize("training", [True, False])
def test_forward_of_a_layer_list_is_the_parametrization_flavours(training):
    weights, us, vs, dims = _layers()
    expected = []
    for w, u, v, dim in zip(weights, us, vs, dims):
        sn = TorchParametrization(w, dim=dim)
        with torch.no_grad():
            sn._u.copy_(u)
            sn._v.copy_(v)
        sn.train(training)
        expected.append((sn(w), sn._u, sn._v))
    before = [(u.clone(), v.clone()) for u, v in zip(us, vs)]
    w_sn, sigmas = reference.spectral_norm(weights, us, vs, dims, True, 1, 1e-12, training)
    assert len(w_sn) == len(sigmas) == len(weights)
    for i, (out, u, v) in enumerate(expected):
        assert torch.equal(w_sn[i], out), i
        assert torch.equal(us[i], u) and torch.equal(vs[i], v), i
        changed = not torch.equal(us[i], before[i][0])
        assert changed == training, i
        assert sigmas[i].ndim == 0
        torch.testing.assert_close(w_sn[i] * sigmas[i], weights[i], rtol=1e-6, atol=1e-6)


def test_two_calls_then_one_backward():
    # The vectors σ used are clones: updating u, v again before the backward is fine.
    weights, us, vs, dims = _layers()
    weights = [w.requires_grad_() for w in weights]
    first, _ = reference.spectral_norm(weights, us, vs, dims, True, 1, 1e-12, True)
    second, _ = reference.spectral_norm(weights, us, vs, dims, True, 1, 1e-12, True)
    sum(a.sum() - b.square().sum() for a, b in zip(first, second)).backward()
    assert all(w.grad is not None for w in weights)


@pytest.mark.parametrize("with_grad_sigmas", [False, True])
def test_closed_form_backward_is_autograds(with_grad_sigmas):
    weights, us, vs, dims = _layers(torch.float64)
    leaves = [w.clone().requires_grad_() for w in weights]
    w_sn, sigmas = reference.spectral_norm(leaves, us, vs, dims, True, 2, 1e-12, True)
    grads = [torch.randn_like(w) for w in weights]
    grad_sigmas = [torch.randn((), dtype=torch.float64) if with_grad_sigmas else torch.zeros((), dtype=torch.float64) for _ in weights]
    loss = sum((o * g).sum() for o, g in zip(w_sn, grads)) + sum(s * g for s, g in zip(sigmas, grad_sigmas))
    expected = torch.autograd.grad(loss, leaves)
    got = reference.spectral_norm_backward(
        grads, grad_sigmas, [o.detach() for o in w_sn], [s.detach() for s in sigmas], us, vs, dims
    )
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"layer {i}")


@pytest.mark.parametrize("u_first", [True, False])
def test_sigma_converges_to_the_largest_singular_value(u_first):
    weights, us, vs, dims = _layers(torch.float64)
    _, sigmas = reference.spectral_norm(weights, us, vs, dims, u_first, 300, 1e-12, True)
    for w, sigma, dim in zip(weights, sigmas, dims):
        top = torch.linalg.matrix_norm(reference.weight_matrix(w, dim), ord=2)
        torch.testing.assert_close(sigma, top, rtol=1e-6, atol=0)
