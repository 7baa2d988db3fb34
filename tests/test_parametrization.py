"""sn_cuda.spectral_norm against torch.nn.utils.parametrizations.spectral_norm.

What torch's own suite checks for the parametrization flavour only (registration,
initialisation, u-then-v updates, the weight gradient, removal, right_inverse, dims, errors),
here checked on sn_cuda, and parity with torch where only this flavour goes
(parametrize.cached, negative dims). What both flavours must do alike (parity with torch over
train/eval sequences on every layer kind of conftest.LAYERS, updates in place and only in
training, gradcheck, ...) is in test_flavours.py.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSpectralNorm

import sn_cuda
from sn_cuda.parametrization import SpectralNorm


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ------------------------------------------------------------------- parity with torch
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
    errors = []
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
