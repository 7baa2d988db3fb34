"""sn_cuda.conv_spectral_norm against the exact operator norm of small convolutions.

The oracle: the dense matrix of the convolution as a linear map (its columns are the
module's outputs for the basis inputs, bias removed), and its largest singular value.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sn_cuda
from sn_cuda.conv_norm import ConvSpectralNorm

# (id, module builder, spatial input shape): stride 2, padding, dilation, groups, 'same'
# with an even kernel (asymmetric padding), transposed convolutions with output_padding
# (including output_padding >= stride, allowed when below the dilation).
CASES = [
    ("conv2d_pad", lambda: nn.Conv2d(2, 3, 3, padding=1), (5, 5)),
    ("conv2d_stride2", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (5, 5)),
    ("conv2d_dilation_groups", lambda: nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2), (5, 5)),
    ("conv2d_same_even_kernel", lambda: nn.Conv2d(2, 3, 4, padding="same"), (5, 5)),
    ("conv2d_valid_rect", lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding="valid"), (5, 6)),
    ("conv1d_stride2", lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (7,)),
    ("conv3d_stride2", lambda: nn.Conv3d(2, 2, 2, stride=2, padding=1), (3, 3, 3)),
    ("convT2d_stride2_outpad", lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (4, 4)),
    ("convT2d_groups_dilation", lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, groups=2, dilation=2), (3, 3)),
    ("convT1d_outpad_dilation", lambda: nn.ConvTranspose1d(2, 3, 3, dilation=2, output_padding=1), (5,)),
    ("convT3d_stride2", lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 2, 2)),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param


def dense_matrix(module: nn.Module, input_shape) -> torch.Tensor:
    """The (output numel, input numel) matrix of x ↦ module(x) − module(0) on one sample."""
    n = module.in_channels * math.prod(input_shape)
    basis = torch.eye(n, dtype=torch.float64, device=module.weight.device)
    basis = basis.reshape(n, module.in_channels, *input_shape)
    with torch.no_grad():
        out = module(basis) - module(torch.zeros_like(basis[:1]))
    return out.reshape(n, -1).T


def operator_norm(module: nn.Module, input_shape) -> float:
    return torch.linalg.matrix_norm(dense_matrix(module, input_shape), ord=2).item()


def build(case, device="cpu", seed=0, **kwargs):
    _, make, shape = case
    torch.manual_seed(seed)
    module = make().to(device=device, dtype=torch.float64)
    return module, shape


def test_sigma_is_the_operator_norm(case, device):
    module, shape = build(case, device)
    exact = operator_norm(module, shape)
    sn_cuda.conv_spectral_norm(module, shape, n_power_iterations=150)
    module.train()
    module.weight  # one training forward of the parametrization: 150 more steps
    sigma = module.parametrizations.weight[0].last_sigma[0].item()
    # Power iteration approaches σ from below.
    assert sigma <= exact * (1 + 1e-9)
    assert sigma == pytest.approx(exact, rel=1e-6)
    # The parametrized module's convolution now has operator norm 1.
    module.eval()
    assert operator_norm(module, shape) == pytest.approx(1.0, rel=1e-6)


def test_adjoint_is_exact(case):
    """⟨A x, y⟩ = ⟨x, Aᵀ y⟩, and A is the module's own convolution (bias excluded)."""
    module, shape = build(case)
    dense = dense_matrix(module, shape)
    p = ConvSpectralNorm(module, shape)
    w = module.weight.detach()
    x = torch.randn(1, module.in_channels, *shape, dtype=torch.float64)
    ax = p._apply_map(x, w)
    torch.testing.assert_close(ax.flatten(), dense @ x.flatten())
    y = torch.randn_like(ax)
    torch.testing.assert_close(p._apply_adjoint(y, w).flatten(), dense.T @ y.flatten())


def test_kernel_divided_by_sigma_and_bias_unchanged():
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    bias = module.bias.detach().clone()
    sn_cuda.conv_spectral_norm(module, (8, 8))
    module.eval()
    x = torch.randn(4, 2, 8, 8)
    p = module.parametrizations.weight[0]
    original = module.parametrizations.weight.original
    sigma = torch.linalg.vector_norm(F.conv2d(p._u.unsqueeze(0), original, None, 2, 1))
    expected = F.conv2d(x, original / sigma, bias, 2, 1)
    torch.testing.assert_close(module(x), expected)
    assert torch.equal(module.bias, bias)


def test_training_updates_u_and_eval_keeps_it():
    torch.manual_seed(0)
    module = sn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1), (5, 5))
    u = module.parametrizations.weight[0]._u
    before = u.clone()
    module.eval()
    module(torch.randn(1, 2, 5, 5))
    assert torch.equal(u, before)
    module.train()
    module(torch.randn(1, 2, 5, 5))
    assert not torch.equal(u, before)
    assert torch.linalg.vector_norm(u).item() == pytest.approx(1.0, rel=1e-5)


def test_gradient_in_eval_mode():
    """W ↦ W / ‖A_W u‖ with u fixed: autograd against finite differences."""
    torch.manual_seed(0)
    module = nn.Conv2d(2, 2, 3, stride=2, padding=1, groups=2).double()
    p = ConvSpectralNorm(module, (5, 5)).eval()
    weight = module.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(p, (weight,))


def test_two_calls_one_backward():
    """D(real), D(fake), one backward: the in-place u update must not break the first graph."""
    torch.manual_seed(0)
    module = sn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1), (5, 5)).train()
    loss = module(torch.randn(2, 2, 5, 5)).sum() + module(torch.randn(2, 2, 5, 5)).square().sum()
    loss.backward()
    assert module.parametrizations.weight.original.grad is not None


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = sn_cuda.conv_spectral_norm(nn.ConvTranspose2d(4, 3, 3, stride=2), (6, 5), n_power_iterations=3)
    a(torch.randn(1, 4, 6, 5))
    state = a.state_dict()
    assert set(state) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0._u"}
    assert state["parametrizations.weight.0._u"].shape == (4, 6, 5)
    torch.manual_seed(1)
    b = sn_cuda.conv_spectral_norm(nn.ConvTranspose2d(4, 3, 3, stride=2), (6, 5), n_power_iterations=3)
    assert not torch.equal(b.parametrizations.weight[0]._u, a.parametrizations.weight[0]._u)
    b.load_state_dict(state)
    a.eval(), b.eval()
    torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=0)


def test_initialization_is_deterministic():
    vectors = []
    for _ in range(2):
        torch.manual_seed(3)
        module = sn_cuda.conv_spectral_norm(nn.Conv1d(2, 3, 3), (9,))
        vectors.append(module.parametrizations.weight[0]._u.clone())
    assert torch.equal(*vectors)


def test_remove_leaves_normalized_kernel():
    torch.manual_seed(0)
    module = sn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3), (5, 5)).eval()
    normalized = module.weight.detach().clone()
    parametrize.remove_parametrizations(module, "weight")
    assert torch.equal(module.weight, normalized)


@pytest.mark.parametrize(
    "make, shape, error, message",
    [
        (lambda: nn.Conv2d(2, 3, 3), (5,), ValueError, "input_shape must hold 2"),
        (lambda: nn.Conv1d(2, 3, 3), (5, 5), ValueError, "input_shape must hold 1"),
        (lambda: nn.Conv2d(2, 3, 3), (5, 0), ValueError, "positive ints"),
        (lambda: nn.Conv2d(2, 3, 3), (2, 2), ValueError, "too small"),
        (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (5, 5), ValueError, "padding_mode"),
        (lambda: nn.Linear(3, 3), (3,), TypeError, "Conv1d/2d/3d"),
    ],
)
def test_errors(make, shape, error, message):
    module = make()
    with pytest.raises(error, match=message):
        sn_cuda.conv_spectral_norm(module, shape)
    assert not parametrize.is_parametrized(module)


def test_rejects_nonpositive_iterations():
    with pytest.raises(ValueError, match="n_power_iterations"):
        sn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3), (5, 5), n_power_iterations=0)


def test_grad_of_functional_call_in_training():
    # torch.func with the parameters only (u stays the module's buffer): as torch's spectral
    # norm, the in-place update of u under the transform must work.
    from torch.func import functional_call, grad

    module = sn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3), (5, 5))
    twin = copy.deepcopy(module)
    x = torch.randn(1, 2, 5, 5)
    params = {k: v.detach() for k, v in module.named_parameters()}
    grads = grad(lambda p: functional_call(module, p, (x,)).square().sum())(params)
    twin(x).square().sum().backward()
    for key, g in grads.items():
        torch.testing.assert_close(g, twin.get_parameter(key).grad, msg=key)
    assert torch.equal(module.parametrizations.weight[0]._u, twin.parametrizations.weight[0]._u)


def test_sigmas_reports_the_operator_norm():
    model = nn.Sequential(sn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1), (6, 6)), nn.ReLU(),
                          sn_cuda.spectral_norm(nn.Conv2d(3, 3, 3)))
    model(torch.randn(2, 2, 6, 6))
    last = model[0].parametrizations.weight[0].last_sigma[0]
    assert sn_cuda.sigmas(model) == {"0": pytest.approx(last.item()), "2": pytest.approx(sn_cuda.sigmas(model)["2"])}
