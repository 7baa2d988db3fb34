"""sn_cuda.legacy against torch.nn.utils.spectral_norm / remove_spectral_norm (the hook flavour).

What torch's own suite checks for the hook flavour only (weight_orig / weight_u / weight_v,
the version metadata, v-then-u updates, removal keeping W/σ as a Parameter, errors), here
checked on sn_cuda.legacy. What both flavours must do alike (parity with torch over train/eval
sequences, updates in place and only in training, gradcheck, ...) is in test_flavours.py;
loading checkpoints (including old version-less ones) is in test_checkpoints.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sn_cuda.legacy
from sn_cuda.legacy import SpectralNorm, remove_spectral_norm, spectral_norm


# ------------------------------------------------------------------- parity with torch
def test_removal_is_torchs(legacy_flavour, layers, make_twins):
    twins = make_twins(legacy_flavour, layers["convtranspose2d_groups"])
    x = twins.input()
    twins.step([x, twins.input()], training=True)
    for m in twins.modules:
        remove_spectral_norm(m)
    t, s = twins.modules
    assert list(s.state_dict()) == list(t.state_dict())
    for key in t.state_dict():
        assert torch.equal(s.state_dict()[key], t.state_dict()[key]), key
    assert not s._forward_pre_hooks and not s._state_dict_hooks
    # torch (2.14) wraps load_state_dict pre-hooks, so its remove_spectral_norm leaves that
    # one behind: sn_cuda removes with torch's own function and leaves exactly the same.
    assert len(s._load_state_dict_pre_hooks) == len(t._load_state_dict_pre_hooks)


# ------------------------------------------------------------------------ registration
def test_registration_parameters_buffers_and_metadata(legacy_flavour, layer):
    m = spectral_norm(layer.make(), layer.param)
    name = layer.param
    hook = legacy_flavour.normalizer(m, name)
    assert type(hook) is SpectralNorm
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    assert f"{name}_orig" in params and name not in params
    assert {f"{name}_u", f"{name}_v"} <= buffers.keys()
    # Before the first forward, `weight` is the plain tensor (shared storage with weight_orig).
    assert not isinstance(getattr(m, name), nn.Parameter)
    assert getattr(m, name).data_ptr() == params[f"{name}_orig"].data_ptr()
    matrix_rows = getattr(m, name).shape[hook.dim]
    assert buffers[f"{name}_u"].shape == (matrix_rows,)
    assert buffers[f"{name}_v"].shape == (getattr(m, name).numel() // matrix_rows,)
    state = m.state_dict()
    assert state._metadata[""]["spectral_norm"] == {f"{name}.version": 1}
    assert name not in state


def test_initial_vectors_are_normalized_draws():
    # The hook flavour iterates nothing at registration: u, v are normalized N(0, 1) draws.
    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, 3)
    torch.manual_seed(1)
    spectral_norm(m)
    torch.manual_seed(1)
    assert torch.equal(m.weight_u, F.normalize(torch.randn(4), dim=0, eps=1e-12))
    assert torch.equal(m.weight_v, F.normalize(torch.randn(27), dim=0, eps=1e-12))


def test_registering_twice_fails_whichever_registered_first():
    # Either flavour's hook counts as a spectral_norm hook for the other.
    for first, second in [
        (spectral_norm, spectral_norm),
        (torch.nn.utils.spectral_norm, spectral_norm),
        (spectral_norm, torch.nn.utils.spectral_norm),
    ]:
        m = first(nn.Linear(3, 4))
        with pytest.raises(RuntimeError, match="Cannot register two spectral_norm hooks on the same parameter weight"):
            second(m)
    # A different parameter is fine.
    spectral_norm(spectral_norm(nn.Linear(3, 4)), "bias")


# -------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("kind", ["linear", "conv2d_groups", "convtranspose2d_groups"])
def test_one_training_step_follows_the_formula(legacy_flavour, layers, kind):
    # v' = normalize(Wᵀ u), u' = normalize(W v'), W_sn = W / (u'·W v'), computed here by hand.
    m = spectral_norm(layers[kind].make())
    hook = legacy_flavour.normalizer(m)
    w = m.weight_orig.detach()
    mat = w.movedim(hook.dim, 0).reshape(w.shape[hook.dim], -1)
    v = F.normalize(mat.t() @ m.weight_u, dim=0, eps=hook.eps)
    u = F.normalize(mat @ v, dim=0, eps=hook.eps)
    sigma = u @ mat @ v
    m(layers[kind].input())
    torch.testing.assert_close(m.weight, w / sigma, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.weight_u, u, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.weight_v, v, rtol=1e-6, atol=1e-7)
    sigmas, index = hook.last_sigma
    torch.testing.assert_close(sigmas[index], sigma, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- removal
@pytest.mark.parametrize("training", [True, False])
def test_remove_keeps_w_over_sigma_as_a_parameter(training):
    m = spectral_norm(nn.Conv2d(3, 5, 3))
    x = torch.randn(2, 3, 6, 6)
    m(x)
    m.train(training)
    # Removal iterates nothing, in either mode: the weight is W/σ of the stored vectors.
    m.eval()
    expected = m(x)
    m.train(training)
    remove_spectral_norm(m)
    assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
    assert sorted(m.state_dict()) == ["bias", "weight"]
    assert not hasattr(m, "weight_u") and not hasattr(m, "weight_orig")
    assert torch.equal(m(x), expected)
    assert "spectral_norm" not in m.state_dict()._metadata[""]


def test_remove_errors():
    with pytest.raises(ValueError, match="spectral_norm of 'weight' not found in"):
        remove_spectral_norm(nn.Linear(3, 4))
    m = spectral_norm(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="spectral_norm of 'bias' not found in"):
        remove_spectral_norm(m, "bias")
    assert remove_spectral_norm is torch.nn.utils.remove_spectral_norm


# ------------------------------------------------------------------------------ errors
ERROR_CASES = {
    "n_power_iterations=0": (lambda: nn.Linear(3, 4), dict(n_power_iterations=0)),
    "n_power_iterations=-2": (lambda: nn.Linear(3, 4), dict(n_power_iterations=-2)),
    "dim too large": (lambda: nn.Linear(3, 4), dict(dim=2)),
    "negative dim": (lambda: nn.Conv2d(3, 4, 3), dict(dim=-1)),
    "missing": (lambda: nn.Linear(3, 4), dict(name="foo")),
    "buffer": (lambda: nn.BatchNorm1d(3), dict(name="running_mean")),
    "None": (lambda: nn.Linear(3, 4, bias=False), dict(name="bias")),
    "uninitialized": (lambda: nn.LazyLinear(4), {}),
    "twice": (lambda: torch.nn.utils.spectral_norm(nn.Linear(3, 4)), {}),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_torchs_and_leave_the_module_alone(case):
    build, kwargs = ERROR_CASES[case]
    errors = []
    for fn in (torch.nn.utils.spectral_norm, sn_cuda.legacy.spectral_norm):
        torch.manual_seed(0)
        m = build()
        pristine = copy.deepcopy(m)
        hooks = (dict(m._forward_pre_hooks), dict(m._state_dict_hooks), dict(m._load_state_dict_pre_hooks))
        with pytest.raises(Exception) as info:
            fn(m, **kwargs)
        errors.append((info.type, str(info.value)))
        assert list(m.state_dict()) == list(pristine.state_dict())
        assert (m._forward_pre_hooks, m._state_dict_hooks, m._load_state_dict_pre_hooks) == hooks
        assert dict(m.named_parameters()).keys() == dict(pristine.named_parameters()).keys()
        for key, value in pristine.state_dict().items():
            if not isinstance(value, nn.parameter.UninitializedParameter):
                assert torch.equal(m.state_dict()[key], value), key
    assert errors[1] == errors[0]


def test_a_module_that_overrides_setattr_sees_the_weight_set():
    # The hook writes W/σ into the module's __dict__ directly (nn.Module.__setattr__'s checks
    # cost per layer per forward), unless the module's class has its own __setattr__.
    class Recording(nn.Linear):
        def __setattr__(self, name, value):
            if name == "weight":
                self.__dict__.setdefault("seen", []).append(value)
            super().__setattr__(name, value)

    torch.manual_seed(0)
    plain, recording = spectral_norm(nn.Linear(4, 3)), None
    torch.manual_seed(0)
    recording = spectral_norm(Recording(4, 3))
    x = torch.randn(2, 4)
    torch.testing.assert_close(recording(x), plain(x), rtol=0, atol=0)
    assert recording.seen and recording.seen[-1] is recording.weight
    assert "weight" not in plain._parameters and "weight" in plain.__dict__


def test_a_parameter_registered_under_the_name_gets_torchs_error():
    # The hook sets module.weight each forward; a Parameter put there since is torch's TypeError,
    # not silently shadowed (it would get no gradient).
    errors = []
    for fn in (torch.nn.utils.spectral_norm, sn_cuda.legacy.spectral_norm):
        m = fn(torch.nn.Linear(4, 3))
        m.weight = torch.nn.Parameter(torch.zeros(3, 4))
        with pytest.raises(TypeError) as info:
            m(torch.randn(2, 4))
        errors.append(str(info.value))
    assert errors[0] == errors[1]
