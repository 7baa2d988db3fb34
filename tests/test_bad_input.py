"""Bad input: what sn_cuda does with it, and that a refused module is left as it was.

Decisions, case by case (the drop-in flavours raise exactly torch's errors — same type, same
message, at the same point, registration or forward; sn_cuda's own functions may raise
clearer errors where that changes no valid behaviour):

* integer or bool weights, 0-D weights, sparse weights: torch refuses them at registration
  (``normal_`` has no integer kernel; dim 0 is out of range; no sparse ``normal_``/``reshape``).
  The drop-ins raise torch's errors, before touching the module. ``sn_cuda.apply`` raises the
  same error and undoes the layers it had already registered.
* meta tensors: torch accepts them (shape-only: deferred initialisation); so does sn_cuda, in
  both flavours and batched — documented and tested behaviour, not an error.
* lazy modules before their first forward: torch's errors from the drop-ins;
  ``sn_cuda.apply`` names the module (ValueError) before changing anything.
* layers of one batch on different devices or dtypes: supported, one fused call per group.
* a zero weight: σ = 0 and W/σ = NaN, u = v = 0, in torch too: sn_cuda matches torch.
* NaN/Inf weights: propagate as in torch (no check: it would cost a pass over every weight).
* ``n_power_iterations`` / ``eps`` of the wrong type: torch checks neither type. A str/None
  eps fails at registration in both flavours (inside ``F.normalize``); a float
  ``n_power_iterations`` fails inside ``range()`` — at registration in the parametrization
  flavour (its registration runs a forward), at the first forward in the hook flavour. The
  drop-ins raise the same errors at the same points, also where the fused ops compute (which
  would otherwise fail in the op's schema with another message); a layer batched by
  ``sn_cuda.batch`` fails at the forward of the model with that same error.
  ``sn_cuda.apply`` checks both types first and names the argument.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sn_cuda
import sn_cuda.legacy
from sn_cuda import ops

TORCH_SN = {
    "legacy": torch.nn.utils.spectral_norm,
    "param": torch.nn.utils.parametrizations.spectral_norm,
}
SN = {"legacy": sn_cuda.legacy.spectral_norm, "param": sn_cuda.spectral_norm}
FLAVOURS = ["legacy", "param"]


class Holder(nn.Module):
    """A module whose ``weight`` is any tensor we give it."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return self.weight


def _value(t):
    # A lazy module's uninitialized parameters have no values to compare; meta/sparse ones
    # are compared by identity only.
    if isinstance(t, nn.parameter.UninitializedTensorMixin) or t.device.type == "meta" or t.is_sparse:
        return None
    return t.detach().clone()


def snapshot(module: nn.Module):
    """Everything registration could change: attributes, parameters, buffers, hooks, values."""
    return {
        "dict": sorted(k for k in vars(module) if not k.startswith("_")),
        "params": {k: (id(p), _value(p)) for k, p in module.named_parameters()},
        "buffers": {k: _value(b) for k, b in module.named_buffers()},
        "pre_hooks": list(module._forward_pre_hooks.values()),
        "state_hooks": len(module._state_dict_hooks) + len(module._load_state_dict_pre_hooks),
        "parametrized": parametrize.is_parametrized(module),
        "class": type(module),
    }


def assert_unchanged(module, before):
    after = snapshot(module)
    assert after["dict"] == before["dict"]
    assert after["pre_hooks"] == before["pre_hooks"]
    assert after["state_hooks"] == before["state_hooks"]
    assert after["parametrized"] == before["parametrized"] and after["class"] is before["class"]
    assert after["params"].keys() == before["params"].keys()
    for k, (pid, value) in before["params"].items():
        assert after["params"][k][0] == pid, f"parameter {k} replaced"
        if value is not None:
            assert torch.equal(after["params"][k][1], value), k
    assert after["buffers"].keys() == before["buffers"].keys()
    for k, value in before["buffers"].items():
        if value is not None:
            assert torch.equal(after["buffers"][k], value), k


def raised(fn, *args, **kwargs):
    """(type, message) of what ``fn`` raises; fails the test if it returns."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return type(info.value), str(info.value)


def assert_same_error_and_unchanged(flavour, make, **kwargs):
    expected = raised(TORCH_SN[flavour], make(), **kwargs)
    module = make()
    before = snapshot(module)
    assert raised(SN[flavour], module, **kwargs) == expected
    assert_unchanged(module, before)


# ------------------------------------------------------------------ refused at registration
def _int_linear(dtype):
    def make():
        m = nn.Linear(4, 3)
        m.weight = nn.Parameter(torch.ones(3, 4, dtype=dtype), requires_grad=False)
        return m

    return make


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_integer_and_bool_weights(flavour, dtype):
    assert_same_error_and_unchanged(flavour, _int_linear(dtype))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_zero_dim_weight(flavour):
    assert_same_error_and_unchanged(flavour, lambda: Holder(nn.Parameter(torch.tensor(2.0))))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sparse_weight(flavour):
    assert_same_error_and_unchanged(flavour, lambda: Holder(nn.Parameter(torch.eye(3).to_sparse())))


def test_apply_undoes_registrations_when_a_layer_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    model[1].weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int64), requires_grad=False)
    before = [snapshot(m) for m in model]
    expected = raised(torch.nn.utils.parametrizations.spectral_norm, _int_linear(torch.int64)())
    assert raised(sn_cuda.apply, model) == expected
    for m, b in zip(model, before):
        assert_unchanged(m, b)
    assert not model._forward_pre_hooks  # no batch hook left behind


# --------------------------------------------------------------------------- lazy modules
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lazy_module_before_its_first_forward(flavour):
    assert_same_error_and_unchanged(flavour, lambda: nn.LazyLinear(3))


def test_apply_names_the_lazy_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3))
    before = [snapshot(model[0])]
    with pytest.raises(ValueError, match=r"module '1'.*lazy"):
        sn_cuda.apply(model)
    assert_unchanged(model[0], before[0])
    model(torch.randn(2, 4))  # after the first forward the lazy layer is an ordinary Linear
    assert len(sn_cuda.apply(model)) == 2
    model(torch.randn(2, 4))
    assert set(sn_cuda.sigmas(model)) == {"0", "1"}


# ---------------------------------------------------------------------------- meta tensors
@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_meta_tensors_work_like_torch(flavour, batched):
    # Deferred initialisation builds models on "meta": shapes flow, nothing is computed.
    outs = []
    for fn in (TORCH_SN[flavour], SN[flavour]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, device="meta"), nn.Flatten(), nn.Linear(64, 2, device="meta"))
        fn(model[0])
        fn(model[2])
        if batched and fn is SN[flavour]:
            sn_cuda.batch(model)
        out = model(torch.randn(2, 3, 6, 6, device="meta"))
        out.sum().backward()
        outs.append((out, model.state_dict()))
    (t_out, t_state), (s_out, s_state) = outs
    assert s_out.device.type == "meta" and s_out.shape == t_out.shape and s_out.dtype == t_out.dtype
    assert {k: (v.shape, v.dtype, v.device) for k, v in s_state.items()} == {
        k: (v.shape, v.dtype, v.device) for k, v in t_state.items()
    }


# --------------------------------------------------------- batches over devices and dtypes
def _mixed_model(sn_fn, devices):
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)])
    torch.manual_seed(1)
    for layer in model:
        sn_fn(layer)
    for layer, (device, dtype) in zip(model, devices):
        layer.to(device=device, dtype=dtype)
    return model


def _run_mixed(model, x):
    # Each layer computes on its own device and dtype; the activations follow.
    for layer in model:
        p = next(layer.parameters())
        x = torch.tanh(layer(x.to(p.device, p.dtype)))
    return x


def _mixed_devices_match_torch(devices, flavour):
    theirs = _mixed_model(TORCH_SN[flavour], devices)
    ours = _mixed_model(SN[flavour], devices)

    class Root(nn.Module):  # batch() hooks the root's forward
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return _run_mixed(self.layers, x)

    root = Root(ours)
    handle = sn_cuda.batch(root)
    assert len(handle) == 3
    exact = all(d == "cpu" for d, _ in devices)
    for _ in range(2):
        x = torch.randn(2, 5)
        out, expected = root(x), _run_mixed(theirs, x)
        out.sum().backward()
        expected.sum().backward()
        for a, b in zip(list(ours.state_dict().values()) + [p.grad for p in ours.parameters()] + [out],
                        list(theirs.state_dict().values()) + [p.grad for p in theirs.parameters()] + [expected]):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b.to(a.device), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_batch_over_dtypes(flavour):
    _mixed_devices_match_torch([("cpu", torch.float32), ("cpu", torch.float64), ("cpu", torch.float32)], flavour)


@pytest.mark.cuda
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_batch_over_devices(flavour):
    _mixed_devices_match_torch([("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.float64)], flavour)


# --------------------------------------------------------------- zero and non-finite weights
def _twins(flavour, batched, fill):
    models = []
    for fn in (TORCH_SN[flavour], SN[flavour]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3))
        with torch.no_grad():
            fill(model[0].weight)
        torch.manual_seed(1)
        fn(model[0])
        fn(model[1])
        if batched and fn is SN[flavour]:
            sn_cuda.batch(model)
        models.append(model)
    return models


@pytest.mark.parametrize(
    "fill",
    [
        pytest.param(lambda w: w.zero_(), id="zero"),
        pytest.param(lambda w: w.__setitem__((1, 2), float("nan")), id="nan"),
        pytest.param(lambda w: w.__setitem__((0, 0), float("inf")), id="inf"),
        pytest.param(lambda w: w.__setitem__((0, 0), -float("inf")), id="-inf"),
    ],
)
@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_zero_and_non_finite_weights_behave_like_torch(flavour, batched, fill):
    theirs, ours = _twins(flavour, batched, fill)
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        x = torch.randn(2, 5)
        out, expected = ours(x), theirs(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        out.sum().backward()
        expected.sum().backward()
        for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=key)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(out).all()  # what torch gives, NaN included: σ = 0 or NaN


# ------------------------------------------------------- n_power_iterations and eps types
BAD_ARGS = [
    pytest.param({"n_power_iterations": 1.5}, id="n_float"),
    pytest.param({"n_power_iterations": "2"}, id="n_str"),
    pytest.param({"n_power_iterations": 0}, id="n_zero"),
    pytest.param({"eps": "1e-12"}, id="eps_str"),
    pytest.param({"eps": None}, id="eps_none"),
]


def _errors(sn_fn, kwargs):
    """(where, type, message) of the first failure: registration or first forward."""
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    before = snapshot(module)
    try:
        sn_fn(module, **kwargs)
    except Exception as e:
        assert_unchanged(module, before)
        return "registration", type(e), str(e)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        module(torch.randn(2, 4))
    except Exception as e:
        for k, v in module.state_dict().items():
            assert torch.equal(v, state[k]), f"{k} changed by a failed forward"
        return "forward", type(e), str(e)
    return None


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "ops"])
@pytest.mark.parametrize("kwargs", BAD_ARGS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_wrong_argument_types_raise_torchs_errors(flavour, kwargs, kernels, monkeypatch):
    expected = _errors(TORCH_SN[flavour], kwargs)
    assert expected is not None, "torch accepted this: the case is not bad input"
    if kernels:  # the path CUDA tensors take with the extension (the ops' CPU default here)
        monkeypatch.setattr(ops, "uses_kernels", lambda weight: True)
    assert _errors(SN[flavour], kwargs) == expected


@pytest.mark.parametrize("batched", [False, True], ids=["layer", "batched"])
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "ops"])
@pytest.mark.parametrize("dim", [0.0, False], ids=["float", "bool"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dim_equal_to_zero_works_as_in_torch(flavour, dim, kernels, batched, monkeypatch):
    # torch's flavours take any dim equal to 0 (they permute only when dim != 0); the ops'
    # schemas take ints.
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    expected = TORCH_SN[flavour](nn.Linear(4, 3), dim=dim)(x)
    if kernels:
        if not sn_cuda._extension.LOADED:
            pytest.skip("needs the compiled extension (the fused op sn_cuda::spectral_norm)")
        monkeypatch.setattr(ops, "uses_kernels", lambda weight: True)
    torch.manual_seed(0)
    model = nn.Sequential(SN[flavour](nn.Linear(4, 3), dim=dim))
    if batched:
        sn_cuda.batch(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_batched_layer_with_a_float_iteration_count_fails_like_torch():
    # The hook flavour accepts n_power_iterations=1.5 at registration, in torch too.
    expected = _errors(torch.nn.utils.spectral_norm, {"n_power_iterations": 1.5})
    model = nn.Sequential(sn_cuda.legacy.spectral_norm(nn.Linear(4, 3), n_power_iterations=1.5))
    sn_cuda.batch(model)
    with pytest.raises(expected[1]) as info:
        model(torch.randn(2, 4))
    assert str(info.value) == expected[2]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"n_power_iterations": 1.5}, "n_power_iterations"),
        ({"n_power_iterations": "1"}, "n_power_iterations"),
        ({"n_power_iterations": True}, "n_power_iterations"),
        ({"eps": "1e-12"}, "eps"),
        ({"eps": None}, "eps"),
    ],
)
def test_apply_names_the_wrong_argument(kwargs, argument):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    before = [snapshot(m) for m in model]
    with pytest.raises(TypeError, match=rf"^apply\(\): {argument} must be"):
        sn_cuda.apply(model, **kwargs)
    for m, b in zip(model, before):
        assert_unchanged(m, b)


def test_apply_passes_torchs_value_error_for_a_non_positive_count():
    model = nn.Sequential(nn.Linear(4, 4))
    before = snapshot(model[0])
    expected = raised(torch.nn.utils.parametrizations.spectral_norm, nn.Linear(4, 4), n_power_iterations=0)
    assert raised(sn_cuda.apply, model, n_power_iterations=0) == expected
    assert_unchanged(model[0], before)


def _conv():
    return nn.Conv2d(2, 3, 3)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: sn_cuda.batch("D"), TypeError, r"batch\(model\): expected an nn.Module, got str"),
        (lambda: sn_cuda.apply(nn.Linear(2, 2), exclude=3), TypeError, "exclude must hold module types"),
        (lambda: sn_cuda.apply(nn.Linear(2, 2), include=nn.Linear(2, 2)), TypeError, "include must hold module types"),
        (lambda: sn_cuda.SpectralPenalty("D"), TypeError, r"SpectralPenalty\(model\): expected an nn.Module"),
        (lambda: sn_cuda.SpectralPenalty(nn.Linear(2, 2), exclude=3), TypeError, "exclude must hold module types"),
        (lambda: sn_cuda.SpectralPenalty(nn.Linear(2, 2), n_power_iterations=None), TypeError, "n_power_iterations must be an int"),
        (lambda: sn_cuda.SpectralPenalty(nn.Linear(2, 2), n_power_iterations=1.5), TypeError, "n_power_iterations must be an int"),
        (lambda: sn_cuda.SpectralPenalty(nn.Linear(2, 2), eps=None), TypeError, "eps must be a float"),
        (lambda: sn_cuda.SpectralPenalty(nn.Linear(2, 2).to(torch.complex64)), TypeError, "real floating-point weights"),
        (lambda: sn_cuda.conv_spectral_norm(_conv(), None), ValueError, "input_shape must hold 2 positive ints"),
        (lambda: sn_cuda.conv_spectral_norm(_conv(), 8), ValueError, "input_shape must hold 2 positive ints"),
        (lambda: sn_cuda.conv_spectral_norm(_conv(), (True, True)), ValueError, "input_shape must hold 2 positive ints"),
        (lambda: sn_cuda.conv_spectral_norm(_conv(), (5, 5), n_power_iterations=None), TypeError, "n_power_iterations must be an int"),
        (lambda: sn_cuda.conv_spectral_norm(_conv(), (5, 5), eps="0"), TypeError, "eps must be a float"),
    ],
    ids=lambda p: p if isinstance(p, str) else "",
)
def test_sn_cudas_own_entry_points_name_the_argument(call, error, message):
    # What sn_cuda adds to torch's API checks its arguments up front, naming them.
    with pytest.raises(error, match=message):
        call()


def test_conv_spectral_norm_takes_numpy_ints():
    import numpy as np

    module = sn_cuda.conv_spectral_norm(_conv(), tuple(np.array([5, 6])))
    assert module.parametrizations.weight[0].input_shape == (5, 6)
