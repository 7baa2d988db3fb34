"""copy.deepcopy after a training forward (EMA copies) and pickling.

torch's hook flavour leaves ``module.weight = W/σ``, a non-leaf, after a forward with grad
enabled, and ``copy.deepcopy(module)`` then fails (``Tensor.__deepcopy__`` accepts graph leaves
only) — the usual way to start an EMA generator. sn_cuda's hook flavour, and ``sn_cuda.batch``
(which also takes over torch's own hooks), copy instead: the copy's ``weight`` is a detached
clone of W/σ (what a forward under no_grad leaves), and the original's ``weight`` is the very
same tensor as before, still attached to the graph of its forward.

Pickling: the hook flavour pickles (module and ``torch.save``), batched or not, as torch's does.
The parametrization flavour raises torch's own error, since torch.nn.utils.parametrize refuses
to pickle parametrized modules (state_dict is the way there); sn_cuda raises exactly that.
"""

import copy
import importlib
import io
import pickle

import pytest
import torch
from torch import nn

import sn_cuda
import sn_cuda.legacy
from sn_cuda.batch import batch_owner
from sn_cuda.layers import spectral_norm_layers

TorchHook = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm

SN = {"legacy": sn_cuda.legacy.spectral_norm, "param": sn_cuda.spectral_norm}


def make_model(flavour: str, batched: bool, sn_fn=None):
    """Conv, transposed conv (dim 1) and linear, each spectral-normalized."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.ConvTranspose2d(4, 4, 3, stride=2),
        nn.Flatten(), nn.Linear(4 * 13 * 13, 2),
    )
    torch.manual_seed(1)
    for i in (0, 2, 4):
        (sn_fn or SN[flavour])(model[i])
    handle = sn_cuda.batch(model) if batched else None
    return model, handle


def sn_vectors(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def assert_state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_deepcopy_after_a_training_forward(flavour, batched):
    model, _ = make_model(flavour, batched)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)  # training forward with grad: legacy leaves a non-leaf module.weight
    weights_before = [model[i].weight for i in (0, 2, 4)] if flavour == "legacy" else None

    ema = copy.deepcopy(model)

    assert_state_equal(ema, model)
    if flavour == "legacy":
        for i, w in zip((0, 2, 4), weights_before):
            # The original reads exactly what it read before the copy, graph included.
            assert model[i].weight is w and w.grad_fn is not None
            # The copy holds the same values, detached (what a no_grad forward leaves).
            assert ema[i].weight.is_leaf and not ema[i].weight.requires_grad
            assert torch.equal(ema[i].weight, w)
    # The original's graph survived the copy.
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # Same state, same next forward: outputs and u/v bit-identical, computed independently.
    x2 = torch.randn(2, 3, 8, 8)
    assert torch.equal(ema(x2), model(x2))
    assert_state_equal(ema, model)


@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_ema_copy_is_independent(flavour, batched):
    model, handle = make_model(flavour, batched)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    ema = copy.deepcopy(model)
    opt.step()
    with torch.no_grad():  # the EMA update
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 0.5)
    model_state = sn_vectors(model)
    ema_state = sn_vectors(ema)
    ema(torch.randn(2, 3, 8, 8))
    assert all(torch.equal(v, model_state[k]) for k, v in model.named_buffers()), "ema moved model's u/v"
    assert any(not torch.equal(v, ema_state[k]) for k, v in ema.named_buffers()), "ema did not iterate"
    model(torch.randn(2, 3, 8, 8))
    assert any(not torch.equal(v, model_state[k]) for k, v in model.named_buffers())
    if batched:
        # The copy carries its own batch handle: removing the original's leaves it batched.
        handle.remove()
        owners = {batch_owner(layer.sn) for layer in spectral_norm_layers(ema)}
        assert len(owners) == 1 and None not in owners and handle not in owners
        assert owners.pop().model is ema
        assert all(batch_owner(layer.sn) is None for layer in spectral_norm_layers(model))
        assert set(sn_cuda.sigmas(ema)) == {"0", "2", "4"}


def test_deepcopy_of_torch_hooks_under_batch():
    # batch() takes torch's own hook flavour over (class switch): it copies too.
    model, handle = make_model("legacy", True, sn_fn=torch.nn.utils.spectral_norm)
    model(torch.randn(2, 3, 8, 8))
    ema = copy.deepcopy(model)
    assert_state_equal(ema, model)
    # The copy's hooks are sn_cuda's (batched); removing the original's batch gives torch's back.
    assert all(type(layer.sn) is sn_cuda.legacy.SpectralNorm for layer in spectral_norm_layers(ema))
    handle.remove()
    assert all(type(layer.sn) is TorchHook for layer in spectral_norm_layers(model))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(ema(x), model(x))


def test_deepcopy_after_forward_under_no_grad_and_in_eval():
    model, _ = make_model("legacy", False)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    assert_state_equal(copy.deepcopy(model), model)
    model.eval()
    model(torch.randn(2, 3, 8, 8))  # eval with grad: W/σ is still a non-leaf
    assert model[0].weight.grad_fn is not None
    assert_state_equal(copy.deepcopy(model), model)


def test_deepcopy_twice_and_of_a_copy():
    model, _ = make_model("legacy", False)
    model(torch.randn(2, 3, 8, 8))
    a = copy.deepcopy(model)
    b = copy.deepcopy(model)
    a(torch.randn(2, 3, 8, 8))
    c = copy.deepcopy(a)  # a copy that has run a forward of its own
    assert_state_equal(b, model)
    assert_state_equal(c, a)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(c(x), a(x))


def _roundtrips():
    def with_pickle(m):
        return pickle.loads(pickle.dumps(m))

    def with_torch_save(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return [pytest.param(with_pickle, id="pickle"), pytest.param(with_torch_save, id="torch_save")]


@pytest.mark.parametrize("roundtrip", _roundtrips())
@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
def test_pickle_legacy_flavour(roundtrip, batched):
    model, _ = make_model("legacy", batched)
    model(torch.randn(2, 3, 8, 8))  # a training forward: module.weight is a non-leaf
    loaded = roundtrip(model)
    assert_state_equal(loaded, model)
    hooks = list(loaded[0]._forward_pre_hooks.values())
    assert any(type(h) is sn_cuda.legacy.SpectralNorm for h in hooks)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert_state_equal(loaded, model)
    # The loaded module trains (a backward reaches weight_orig) and can be unwrapped.
    loaded(x).sum().backward()
    assert loaded[0].weight_orig.grad is not None
    if batched:  # batched by the loaded copy of the handle
        owners = {batch_owner(layer.sn) for layer in spectral_norm_layers(loaded)}
        assert len(owners) == 1 and owners.pop().model is loaded
    else:
        sn_cuda.legacy.remove_spectral_norm(loaded[0])
        assert isinstance(loaded[0].weight, nn.Parameter)


@pytest.mark.parametrize("roundtrip", _roundtrips())
def test_pickle_param_flavour_raises_torchs_error(roundtrip):
    errors = []
    for fn in (torch.nn.utils.parametrizations.spectral_norm, sn_cuda.spectral_norm):
        model, _ = make_model("param", False, sn_fn=fn)
        model(torch.randn(2, 3, 8, 8))
        with pytest.raises(RuntimeError) as info:
            roundtrip(model)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "state_dict" in errors[1]


def test_torch_hooks_pickle_after_batch_is_removed():
    # batch() lends torch's hooks sn_cuda's class for a while; what it leaves must pickle.
    model, handle = make_model("legacy", True, sn_fn=torch.nn.utils.spectral_norm)
    model(torch.randn(2, 3, 8, 8))
    handle.remove()
    model(torch.randn(2, 3, 8, 8))
    loaded = pickle.loads(pickle.dumps(model))
    assert_state_equal(loaded, model)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


class GAN(nn.Module):
    """G and D under one root, batched as one: the EMA generator is a copy of G alone."""

    def __init__(self, flavour):
        super().__init__()
        self.G, _ = make_model(flavour, False)
        self.D = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))
        for i in (0, 2):
            SN[flavour](self.D[i])
        self.log = lambda *args: None  # what a training wrapper may hold: not picklable

    def forward(self, x):
        return self.D(self.G(x))


@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_copy_of_a_submodule_of_a_batched_model(flavour):
    gan = GAN(flavour)
    handle = sn_cuda.batch(gan)
    gan(torch.randn(2, 3, 8, 8)).sum().backward()
    memo = {}
    g_ema = copy.deepcopy(gan.G, memo)
    # Nothing of the root or of D was copied (the handle holds them; the layers do not).
    assert not {id(gan), id(gan.D), id(handle)} & set(memo)
    # The copy is not batched: it computes per layer, as G would alone, and can be batched.
    assert all(batch_owner(layer.sn) is None for layer in spectral_norm_layers(g_ema))
    x = torch.randn(2, 3, 8, 8)
    handle.remove()
    assert_state_equal(g_ema, gan.G)
    assert torch.equal(g_ema(x), gan.G(x))
    sn_cuda.batch(g_ema)
    assert torch.equal(g_ema(x), gan.G(x))
    assert_state_equal(g_ema, gan.G)
    if flavour == "legacy":  # and it pickles without the root (whose lambda would not)
        sn_cuda.batch(gan)
        loaded = pickle.loads(pickle.dumps(gan.G))
        assert_state_equal(loaded, gan.G)


@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_deepcopy_from_a_forward_hook_of_a_batched_model(flavour):
    # A snapshot taken while the root's forward runs (a hook registered before batch()'s):
    # W/σ staged for that forward is not copied; the copy is batched by a handle of its own.
    model, _ = make_model(flavour, False)
    copies = []
    model.register_forward_hook(lambda module, args, out: copies.append(copy.deepcopy(module)))
    sn_cuda.batch(model)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    snapshot = copies[0]
    assert_state_equal(snapshot, model)
    owners = {batch_owner(layer.sn) for layer in spectral_norm_layers(snapshot)}
    assert len(owners) == 1 and owners.pop().model is snapshot
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(snapshot(x), model(x))
    assert_state_equal(snapshot, model)
