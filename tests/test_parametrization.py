"""sn_cuda.spectral_norm against torch.nn.utils.parametrizations.spectral_norm.

What torch's own suite checks for the parametrization flavour (registration, initialisation,
u/v updated in place and only in training, eval reusing the stored vectors, gradcheck,
removal, right_inverse, dims, errors), here checked on sn_cuda, and parity with torch itself
over train/eval sequences on every layer kind of conftest.LAYERS.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSpectralNorm

import sn_cuda
from sn_cuda.parametrization import SpectralNorm


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ------------------------------------------------------------------- parity with torch
def test_parity_over_train_eval_sequence(param_flavour, layer, device, make_twins):
    twins = make_twins(param_flavour, layer, device)
    twins.assert_state_same("after registration")
    x = twins.input
    twins.step([x()], training=True)
    twins.step([x(), x()], training=True)  # D(real), D(fake), one backward
    twins.step([x()], training=False)
    twins.step([x(), x()], training=False)
    twins.step([x()], training=True)
    twins.assert_state_same("after the sequence")


@pytest.mark.parametrize("n_power_iterations, eps", [(3, 1e-12), (1, 1e-3)])
def test_parity_with_arguments(param_flavour, layers, make_twins, n_power_iterations, eps):
    for name in ("conv2d_groups", "convtranspose2d_groups"):
        twins = make_twins(param_flavour, layers[name], n_power_iterations=n_power_iterations, eps=eps)
        twins.assert_state_same("after registration")
        twins.step([twins.input(), twins.input()], training=True)
        twins.step([twins.input()], training=False)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_parity_complex_weights(param_flavour, layers, make_twins, dtype):
    for name in ("linear", "conv2d_groups"):
        twins = make_twins(param_flavour, layers[name], dtype=dtype)
        twins.assert_state_same("after registration")
        twins.step([twins.input(), twins.input()], training=True)
        twins.step([twins.input()], training=False)



def test_parity_when_eps_matters(param_flavour, layers, make_twins):
    # eps above σ(W): every normalization is clamped by eps, so only an eps passed through
    # unchanged gives torch's numbers.
    layer = layers["conv2d_groups"]
    torch.manual_seed(0)
    sigma_max = torch.linalg.matrix_norm(layer.make().weight.detach().flatten(1), ord=2).item()
    twins = make_twins(param_flavour, layer, eps=1.2 * sigma_max)
    twins.assert_state_same("after registration")
    twins.step([twins.input()], training=True)
    twins.step([twins.input()], training=False)
    twins.step([twins.input()], training=True)

def test_parity_fp64(param_flavour, layers, make_twins):
    twins = make_twins(param_flavour, layers["conv3d_groups"], dtype=torch.float64)
    twins.step([twins.input(), twins.input()], training=True)
    twins.step([twins.input()], training=False)


def test_parity_under_cached(param_flavour, layers, make_twins):
    # Inside parametrize.cached() the weight is computed (and u, v iterated) once.
    twins = make_twins(param_flavour, layers["linear"]).train()
    x = twins.input()
    outs = []
    for module in twins.modules:
        with parametrize.cached():
            outs.append(module(x) + module(x))
    assert torch.equal(outs[1], outs[0])
    twins.assert_vectors_same("after two cached calls")


def test_negative_dim_is_torchs(param_flavour, layers, make_twins):
    twins = make_twins(param_flavour, layers["conv2d_groups"], dim=-3)
    assert twins.sn.parametrizations.weight[0].dim == 1
    twins.assert_state_same("after registration")
    explicit = make_twins(param_flavour, layers["conv2d_groups"], dim=1)
    assert torch.equal(explicit.sn.parametrizations.weight[0]._u, twins.sn.parametrizations.weight[0]._u)
    twins.step([twins.input()], training=True)


# ------------------------------------------------------------------------ registration
def test_registration_parameters_buffers_and_keys(param_flavour, layer, make_twins):
    twins = make_twins(param_flavour, layer)
    m, name = twins.sn, layer.param
    assert parametrize.is_parametrized(m, name)
    sn = m.parametrizations[name][0]
    assert type(sn) is SpectralNorm and isinstance(sn, TorchSpectralNorm)
    params = dict(m.named_parameters())
    assert f"parametrizations.{name}.original" in params and name not in params
    assert name not in m._parameters
    if m.parametrizations[name].original.ndim > 1:
        assert {f"parametrizations.{name}.0._u", f"parametrizations.{name}.0._v"} <= dict(m.named_buffers()).keys()
    else:
        assert not hasattr(sn, "_u")
    assert list(m.state_dict()) == list(twins.torch.state_dict())
    assert type(m).__name__ == type(twins.torch).__name__ == "Parametrized" + type(layer.build()).__name__


@pytest.mark.parametrize("training", [True, False])
def test_initialisation_is_15_iterations_plus_the_registration_check(training):
    # u, v drawn from N(0, 1) and normalized, 15 power iterations, then one more when
    # register_parametrization evaluates the parametrization of a module in training mode.
    torch.manual_seed(0)
    m = nn.Linear(5, 7).train(training)
    w = m.weight.detach().clone()
    torch.manual_seed(1)
    sn_cuda.spectral_norm(m)
    torch.manual_seed(1)
    u = F.normalize(torch.randn(7), dim=0, eps=1e-12)
    v = F.normalize(torch.randn(5), dim=0, eps=1e-12)
    for _ in range(16 if training else 15):
        u = F.normalize(torch.mv(w, v), dim=0, eps=1e-12)
        v = F.normalize(torch.mv(w.t(), u), dim=0, eps=1e-12)
    sn = m.parametrizations.weight[0]
    assert sn.training == training
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)


@pytest.mark.parametrize("kind, default", [(nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 1), (nn.ConvTranspose3d, 1), (nn.Conv2d, 0)])
def test_default_dim(kind, default):
    m = sn_cuda.spectral_norm(kind(4, 6, 3))
    sn = m.parametrizations.weight[0]
    assert sn.dim == default
    assert sn._u.shape == (m.weight.shape[default],)
    assert sn_cuda.spectral_norm(kind(4, 6, 3), dim=0).parametrizations.weight[0].dim == 0


def test_one_dimensional_weight_is_divided_by_its_norm():
    m = sn_cuda.spectral_norm(nn.Linear(5, 7), "bias")
    bias = m.parametrizations.bias.original
    torch.testing.assert_close(m.bias, bias / bias.norm(), rtol=1e-6, atol=0)


# -------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("kind", ["linear", "conv2d_groups", "convtranspose2d_groups"])
def test_one_training_step_follows_the_formula(layers, kind):
    # u' = normalize(W v), v' = normalize(Wᵀ u'), W_sn = W / (u'·W v'), computed here by hand.
    layer = layers[kind]
    m = sn_cuda.spectral_norm(layer.make())
    sn = m.parametrizations.weight[0]
    w = m.parametrizations.weight.original.detach()
    mat = w.movedim(sn.dim, 0).reshape(w.shape[sn.dim], -1)
    u, v = sn._u.clone(), sn._v.clone()
    u = F.normalize(mat @ v, dim=0, eps=sn.eps)
    v = F.normalize(mat.t() @ u, dim=0, eps=sn.eps)
    sigma = u @ mat @ v
    weight = m.weight
    torch.testing.assert_close(weight, w / sigma, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sn._u, u, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sn._v, v, rtol=1e-6, atol=1e-7)
    # last_sigma is σ of that forward (what sn_cuda.sigmas reads).
    sigmas, index = sn.last_sigma
    torch.testing.assert_close(sigmas[index], sigma, rtol=1e-6, atol=0)


def test_vectors_change_in_place_and_only_in_training():
    m = sn_cuda.spectral_norm(nn.Conv2d(3, 5, 3))
    sn = m.parametrizations.weight[0]
    x = _x(2, 3, 6, 6)
    ptrs = (sn._u.data_ptr(), sn._v.data_ptr())
    before = (sn._u.clone(), sn._v.clone())
    m(x)
    # In place (DataParallel replicas share the buffers' storage), and a real update.
    assert (sn._u.data_ptr(), sn._v.data_ptr()) == ptrs
    assert not torch.equal(sn._u, before[0]) or not torch.equal(sn._v, before[1])
    m.eval()
    before = (sn._u.clone(), sn._v.clone())
    m(x)
    m(x)
    assert torch.equal(sn._u, before[0]) and torch.equal(sn._v, before[1])
    assert (sn._u.data_ptr(), sn._v.data_ptr()) == ptrs


def test_eval_output_equals_last_training_output():
    m = sn_cuda.spectral_norm(nn.Linear(6, 4))
    x = _x(3, 6)
    for _ in range(3):
        out_train = m(x)
    m.eval()
    assert torch.equal(m(x), out_train)
    assert torch.equal(m(x), out_train)


def test_two_forwards_one_backward():
    # The GAN pattern: u, v are updated again by the second call before the first backward.
    m = sn_cuda.spectral_norm(nn.Linear(6, 4))
    loss = m(_x(3, 6)).sum() - m(_x(3, 6)).sum()
    loss.backward()
    assert m.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training):
    torch.manual_seed(0)
    m = sn_cuda.spectral_norm(nn.Linear(4, 3).double()).train(training)
    sn = m.parametrizations.weight[0]
    saved = sn._u.clone(), sn._v.clone()
    key = "parametrizations.weight.original"

    def two_calls(x, weight):
        # Every evaluation starts from the same u, v, so finite differences see one function.
        with torch.no_grad():
            sn._u.copy_(saved[0])
            sn._v.copy_(saved[1])
        return functional_call(m, {key: weight}, (x,)) + functional_call(m, {key: weight}, (x * 2,))

    x = _x(2, 4, dtype=torch.float64).requires_grad_()
    weight = m.get_parameter(key).detach().clone().requires_grad_()
    # In training, u and v depend on W through power iteration, which torch treats as a
    # constant: the weight gradient is checked in eval mode only (and by the formula test).
    inputs = (x, weight.requires_grad_(not training))
    assert torch.autograd.gradcheck(two_calls, inputs)
    if not training:
        assert torch.autograd.gradgradcheck(two_calls, inputs)


def test_weight_gradient_treats_u_v_as_constants():
    # ∂L/∂W = (G − ⟨G, W_sn⟩ u vᵀ) / σ with the post-update u, v (torch's formula).
    m = sn_cuda.spectral_norm(nn.Linear(6, 4).double())
    sn = m.parametrizations.weight[0]
    weight = m.weight
    g = torch.randn_like(weight)
    (weight * g).sum().backward()
    u, v = sn._u, sn._v
    w = m.parametrizations.weight.original
    sigma = u @ w.detach() @ v
    expected = (g - (g * weight.detach()).sum() * torch.outer(u, v)) / sigma
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------- removal and inverse
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_remove_is_torchs(param_flavour, layers, make_twins, training, leave_parametrized):
    twins = make_twins(param_flavour, layers["conv2d_groups"])
    x = twins.input()
    twins.step([x], training=True)
    twins.train(training)
    before = [m(x) for m in twins.modules][1]
    for m in twins.modules:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=leave_parametrized)
    t, s = twins.modules
    assert type(s) is nn.Conv2d and not parametrize.is_parametrized(s)
    assert isinstance(s.weight, nn.Parameter)
    assert list(s.state_dict()) == list(t.state_dict())
    assert sorted(s.state_dict()) == ["bias", "weight"]
    assert torch.equal(s.weight, t.weight)
    if leave_parametrized and not training:
        # Eval mode iterates nothing on removal: the layer keeps computing what it did.
        assert torch.equal(s(x), before)


def test_right_inverse_sets_the_original(param_flavour, layers, make_twins):
    twins = make_twins(param_flavour, layers["linear"])
    value = torch.randn(7, 5)
    for m in twins.modules:
        with torch.no_grad():
            m.weight = value
    assert torch.equal(twins.sn.parametrizations.weight.original, value)
    assert torch.equal(twins.sn.parametrizations.weight.original, twins.torch.parametrizations.weight.original)
    twins.step([twins.input()], training=True)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    m = sn_cuda.spectral_norm(nn.Conv2d(3, 5, 3))
    x = _x(2, 3, 6, 6)
    m(x)
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    fresh = sn_cuda.spectral_norm(nn.Conv2d(3, 5, 3))
    fresh.load_state_dict(torch.load(buffer))
    for a, b in zip(fresh.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)
    m.eval()
    fresh.eval()
    assert torch.equal(fresh(x), m(x))
    m.train()
    fresh.train()
    assert torch.equal(fresh(x), m(x))


# ------------------------------------------------------------------------------ errors
ERROR_CASES = {
    "n_power_iterations=0": (lambda: nn.Linear(3, 4), dict(n_power_iterations=0)),
    "n_power_iterations=-1": (lambda: nn.Linear(3, 4), dict(n_power_iterations=-1)),
    "dim too large": (lambda: nn.Linear(3, 4), dict(dim=2)),
    "dim too small": (lambda: nn.Conv2d(3, 4, 3), dict(dim=-5)),
    "missing": (lambda: nn.Linear(3, 4), dict(name="foo")),
    "None": (lambda: nn.Linear(3, 4, bias=False), dict(name="bias")),
    "uninitialized": (lambda: nn.LazyLinear(4), {}),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_torchs_and_leave_the_module_alone(case):
    build, kwargs = ERROR_CASES[case]
    errors, modules = [], []
    for fn in (torch.nn.utils.parametrizations.spectral_norm, sn_cuda.spectral_norm):
        torch.manual_seed(0)
        m = build()
        pristine = copy.deepcopy(m)
        with pytest.raises(Exception) as info:
            fn(m, **kwargs)
        errors.append((info.type, str(info.value)))
        assert type(m) is type(pristine) and not parametrize.is_parametrized(m)
        assert list(m.state_dict()) == list(pristine.state_dict())
        assert dict(m.named_modules()).keys() == dict(pristine.named_modules()).keys()
        for key, value in pristine.state_dict().items():
            if not isinstance(value, nn.parameter.UninitializedParameter):
                assert torch.equal(m.state_dict()[key], value)
    assert errors[1] == errors[0]
