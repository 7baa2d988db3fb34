"""sn_cuda.batch / apply / sigmas: whole models, one fused call per forward, torch's numbers.

The batched path must equal torch's per-layer spectral norm (either flavour) on whole models
over optimizer steps in train and eval, leave the state_dict as it was, and come off cleanly.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sn_cuda
from sn_cuda import ops
from sn_cuda.layers import spectral_norm_layers


class Block(nn.Module):
    """A small SNGAN-style residual block: two 3x3 convs, a 1x1 shortcut, average pooling."""

    def __init__(self, cin, cout):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.c2(torch.relu(self.c1(torch.relu(x))))
        return nn.functional.avg_pool2d(h + self.sc(x), 2)


class Disc(nn.Module):
    """Conv, transposed conv, embedding projection and a linear head: every SN layer kind."""

    def __init__(self):
        super().__init__()
        self.b1 = Block(3, 8)
        self.b2 = Block(8, 8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 1)
        self.embed = nn.Embedding(5, 4)

    def forward(self, x, y):
        h = self.up(self.b2(self.b1(x))).sum(dim=(2, 3))
        return self.head(h).squeeze(1) + (self.embed(y) * h).sum(1)


def sn_layers(model, flavour):
    """Apply torch's spectral norm to every weight; 'mixed' alternates the two flavours."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding))]
    for i, m in enumerate(mods):
        if flavour == "param" or (flavour == "mixed" and i % 2 == 0):
            torch.nn.utils.parametrizations.spectral_norm(m)
        else:
            torch.nn.utils.spectral_norm(m)
    return model


def twin_models(flavour, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    base = Disc().to(device, dtype)
    torch.manual_seed(1)
    a = sn_layers(copy.deepcopy(base), flavour)
    torch.manual_seed(1)
    b = sn_layers(copy.deepcopy(base), flavour)
    return a, b


def assert_same_state(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=k)


def gan_step(model, opt, device, dtype):
    """The GAN pattern: D(real) and D(fake), one backward, one optimizer step."""
    real = torch.randn(4, 3, 8, 8, device=device, dtype=dtype)
    fake = torch.randn(4, 3, 8, 8, device=device, dtype=dtype)
    y = torch.randint(0, 5, (4,), device=device)
    loss = torch.relu(1 - model(real, y)).mean() + torch.relu(1 + model(fake, y)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("flavour", ["param", "legacy", "mixed"])
def test_batched_model_matches_torch_over_training(flavour, device):  # device: conftest's, cuda marked
    a, b = twin_models(flavour, device)
    handle = sn_cuda.batch(b)
    assert len(handle) == 9
    oa = torch.optim.Adam(a.parameters(), lr=1e-2)
    ob = torch.optim.Adam(b.parameters(), lr=1e-2)
    exact = device == "cpu"  # the reference path runs torch's exact op sequence
    for step in range(3):
        torch.manual_seed(100 + step)
        la = gan_step(a, oa, device, torch.float32)
        torch.manual_seed(100 + step)
        lb = gan_step(b, ob, device, torch.float32)
        torch.testing.assert_close(la, lb, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5)
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb
            torch.testing.assert_close(pa.grad, pb.grad, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-4)
        assert_same_state(a, b, atol=0 if exact else 1e-5)
        # eval: no iteration, the stored vectors; outputs equal, buffers unchanged
        a.eval(), b.eval()
        x, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([0, 3], device=device)
        before = copy.deepcopy(b.state_dict())
        torch.testing.assert_close(a(x, y), b(x, y), atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5)
        assert_same_state(b, _Holder(before))
        a.train(), b.train()


class _Holder(nn.Module):
    def __init__(self, sd):
        super().__init__()
        self._sd = sd

    def state_dict(self, *args, **kwargs):
        return self._sd


def test_one_fused_call_per_group_per_forward(monkeypatch):
    _, b = twin_models("mixed")
    sn_cuda.batch(b)
    calls = []
    real = ops.spectral_norm

    def counting(weights, *args, **kwargs):
        calls.append(len(weights))
        return real(weights, *args, **kwargs)

    monkeypatch.setattr(ops, "spectral_norm", counting)
    b(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    # Two groups: the parametrization flavour (u first) and the hook flavour (v first).
    assert sorted(calls) == [4, 5]


def test_state_dict_keys_and_checkpoints_unchanged_by_batching():
    a, b = twin_models("mixed")
    keys = list(b.state_dict())
    handle = sn_cuda.batch(b)
    assert list(b.state_dict()) == keys
    b(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    b.load_state_dict(a.state_dict())  # a torch checkpoint loads into the batched model
    assert_same_state(a, b)
    handle.remove()
    a.load_state_dict(b.state_dict())  # and back
    assert_same_state(a, b)


def test_remove_restores_torch_classes_and_per_layer_behaviour():
    a, b = twin_models("mixed")
    classes = [type(p) for m in b.modules() if parametrize.is_parametrized(m) for p in m.parametrizations.weight]
    hooks = [type(h) for m in b.modules() for h in m._forward_pre_hooks.values()]
    lists = [m.parametrizations.weight for m in b.modules() if parametrize.is_parametrized(m)]
    handle = sn_cuda.batch(b)
    assert all(type(l) is not parametrize.ParametrizationList for l in lists)  # the staged reads
    b(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    a(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))  # keep the two in step (same RNG use aside)
    handle.remove()
    assert classes == [type(p) for m in b.modules() if parametrize.is_parametrized(m) for p in m.parametrizations.weight]
    assert all(type(l) is parametrize.ParametrizationList for l in lists)
    assert all("_staged" not in l.__dict__ and "_staged" not in l[0].__dict__ for l in lists)
    assert hooks == [type(h) for m in b.modules() for h in m._forward_pre_hooks.values()]
    assert not b._forward_pre_hooks and not b._forward_hooks
    # per-layer again, still torch's numbers
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 4])
    torch.testing.assert_close(a(x, y), b(x, y), atol=1e-6, rtol=1e-6)
    sn_cuda.batch(b).remove()  # can be batched again after removal


def test_batching_twice_is_an_error_and_changes_nothing():
    _, b = twin_models("param")
    sn_cuda.batch(b)
    with pytest.raises(ValueError, match="already batched"):
        sn_cuda.batch(b.b1)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        sn_cuda.batch("not a module")


def test_layer_called_twice_iterates_once_per_root_forward():
    """The documented difference: torch iterates on every call of the layer, batch() once per
    forward of the root. With one call per layer per forward the two are identical."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.utils.spectral_norm(nn.Linear(4, 4))

        def forward(self, x):
            return self.lin(self.lin(x))

    torch.manual_seed(0)
    a = Twice()
    b = copy.deepcopy(a)
    sn_cuda.batch(b)
    x = torch.randn(3, 4)
    a(x), b(x)
    u0 = b.lin.weight_u.clone()
    # the batched model's u equals one iteration of torch's per-layer hook from the same start
    torch.manual_seed(0)
    c = Twice()
    c.lin(x)
    torch.testing.assert_close(u0, c.lin.weight_u, atol=0, rtol=0)
    assert not torch.equal(a.lin.weight_u, b.lin.weight_u)  # torch ran two iterations


def test_mixed_dtypes_are_grouped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3).double())
    torch.nn.utils.parametrizations.spectral_norm(model[0])
    torch.nn.utils.parametrizations.spectral_norm(model[1])
    ref = copy.deepcopy(model)
    sn_cuda.batch(model)

    class Cast(nn.Module):
        def __init__(self, seq):
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return self.seq[1](self.seq[0](x).double())

    x = torch.randn(2, 5)
    torch.testing.assert_close(Cast(model)(x), Cast(ref)(x), atol=0, rtol=0)
    assert model[1].parametrizations.weight.original.dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_are_grouped():
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(5, 6), nn.Linear(6, 3).cuda()])
    for m in model:
        torch.nn.utils.spectral_norm(m)
    ref = copy.deepcopy(model)

    class TwoDevices(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers[1](self.layers[0](x).cuda())

    b = TwoDevices(model)
    sn_cuda.batch(b)
    x = torch.randn(2, 5)
    torch.testing.assert_close(b(x), TwoDevices(ref)(x), atol=1e-5, rtol=1e-5)


def test_sigmas_are_those_of_the_last_forward():
    _, b = twin_models("mixed")
    sn_cuda.batch(b)
    assert sn_cuda.sigmas(b) == {}  # nothing has run yet
    b(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    got = sn_cuda.sigmas(b)
    assert set(got) == {"b1.c1", "b1.c2", "b1.sc", "b2.c1", "b2.c2", "b2.sc", "up", "head", "embed"}
    for name, module in b.named_modules():
        if name not in got:
            continue
        # σ = u·W v from the stored (post-update) vectors and the weight
        if parametrize.is_parametrized(module):
            p = module.parametrizations.weight
            w, u, v, dim = p.original, p[0]._u, p[0]._v, p[0].dim
        else:
            w, u, v = module.weight_orig, module.weight_u, module.weight_v
            dim = next(iter(module._forward_pre_hooks.values())).dim
        expected = torch.dot(u, sn_cuda.reference.weight_matrix(w, dim) @ v).item()
        assert got[name] == pytest.approx(expected, rel=1e-6)


def test_apply_normalizes_selected_layers_and_batches_them():
    torch.manual_seed(0)
    model = Disc()
    handle = sn_cuda.apply(model, exclude=["b2.*", nn.Embedding])
    normalized = {n for n, m in model.named_modules() if parametrize.is_parametrized(m)}
    assert normalized == {"b1.c1", "b1.c2", "b1.sc", "up", "head"}
    assert len(handle) == 5
    assert model.up.parametrizations.weight[0].dim == 1  # ConvTranspose: dim 1, as torch
    model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert set(sn_cuda.sigmas(model)) == normalized

    torch.manual_seed(0)
    only = Disc()
    sn_cuda.apply(only, include=nn.Linear, n_power_iterations=3, eps=1e-6)
    p = only.head.parametrizations.weight[0]
    assert (p.n_power_iterations, p.eps) == (3, 1e-6)
    assert [n for n, m in only.named_modules() if parametrize.is_parametrized(m)] == ["head"]


def test_apply_leaves_existing_spectral_norms_alone():
    torch.manual_seed(0)
    model = Disc()
    torch.nn.utils.spectral_norm(model.head)
    sn_cuda.conv_spectral_norm(model.b1.c2, (8, 8))
    sn_cuda.apply(model)
    assert not parametrize.is_parametrized(model.head)  # keeps its legacy hook
    assert parametrize.is_parametrized(model.b1.c1)
    # The operator norm of the convolution is a spectral norm too: not divided twice.
    assert [type(p).__name__ for p in model.b1.c2.parametrizations.weight] == ["ConvSpectralNorm"]


def test_apply_bad_arguments_change_nothing():
    torch.manual_seed(0)
    model = Disc()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="include"):
        sn_cuda.apply(model, include=[3])
    with pytest.raises(ValueError, match="n_power_iterations"):
        sn_cuda.apply(model, n_power_iterations=0)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert list(model.state_dict()) == list(before)

    lazy = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="uninitialized"):
        sn_cuda.apply(lazy)
    assert not parametrize.is_parametrized(lazy[0])


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


class _Reads(nn.Module):
    """A root whose forward returns what its layer's ``weight`` reads as."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.weight


@pytest.mark.parametrize("when", ["before_batch", "after_batch"])
def test_parametrizations_after_spectral_norm_still_apply(when):
    """Spectral norm first, then another parametrization: batched, the chain still runs on the
    staged W/σ, whether the second one was registered before or after batch()."""
    torch.manual_seed(0)
    layer = sn_cuda.spectral_norm(nn.Linear(5, 4))
    reference = copy.deepcopy(layer)
    if when == "before_batch":
        parametrize.register_parametrization(layer, "weight", _Double())
    root = _Reads(layer)
    handle = sn_cuda.batch(root)
    assert len(handle) == 1
    if when == "after_batch":
        parametrize.register_parametrization(layer, "weight", _Double())
    torch.testing.assert_close(root(), 2 * reference.weight, rtol=1e-6, atol=1e-7)
    handle.remove()


def test_data_parallel_replicas_compute_their_own_weights(monkeypatch):
    """nn.DataParallel's replicas share the root's hooks (a copy of its __dict__) and run in
    threads: the batch hook must leave them per layer, and stage only for the model it was
    given. Simulated on the CPU with the replica torch makes of a root module."""
    _, model = twin_models("param")
    sn_cuda.batch(model)
    calls = []
    real = ops.spectral_norm

    def counting(weights, *args):
        calls.append(len(weights))
        return real(weights, *args)

    monkeypatch.setattr(ops, "spectral_norm", counting)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    model(x, y)
    assert calls == [9]  # the model itself: one fused call for its 9 layers
    calls.clear()
    replica = model._replicate_for_data_parallel()
    assert replica._forward_pre_hooks is model._forward_pre_hooks
    replica(x, y)
    assert calls == [1] * 9  # the replica: per layer, as without batch()


def test_one_dimensional_weights_stay_per_layer():
    torch.manual_seed(0)
    model = nn.Module()
    model.vec = nn.Parameter(torch.randn(7))
    sn_cuda.spectral_norm(model, "vec")

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self):
            return self.m.vec

    root = Root()
    with pytest.warns(UserWarning, match=r"batch\(model\): found no spectral norm under Root that it can batch"):
        handle = sn_cuda.batch(root)
    assert len(handle) == 0
    torch.testing.assert_close(root(), nn.functional.normalize(model.parametrizations.vec.original, dim=0))


def test_batch_of_a_model_without_spectral_norm_warns():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="found no spectral norm under Sequential") as caught:
        handle = sn_cuda.batch(model)
    assert caught[0].filename == __file__  # the user's call, not sn_cuda's
    assert len(handle) == 0
    handle.remove()
    with pytest.warns(UserWarning, match=r"^apply\(\): found no spectral norm") as caught:
        sn_cuda.apply(model, exclude=nn.Linear).remove()
    assert caught[0].filename == __file__


# ------------------------------------------------ what torch users do to a batched model
def train_twins(a, b, steps=2):
    """GAN steps on torch's model ``a`` and the batched ``b``; the same numbers after each."""
    oa, ob = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, b))
    for step in range(steps):
        torch.manual_seed(200 + step)
        la = gan_step(a, oa, "cpu", torch.float32)
        torch.manual_seed(200 + step)
        lb = gan_step(b, ob, "cpu", torch.float32)
        assert torch.equal(la, lb), f"loss, step {step}"
        assert_same_state(a, b)


class _Interrupt(BaseException):
    """Like KeyboardInterrupt: no Exception, so nn.Module skips the forward hooks."""


@pytest.mark.parametrize("flavour", ["param", "legacy"])
def test_interrupted_forward_leaves_nothing_stale(flavour):
    # Ctrl-C in a notebook stops a forward midway; the next forwards must follow the weights.
    a, b = twin_models(flavour)
    # Raised by a forward hook of the root that runs before batch's own (which is skipped):
    # every layer has run, in torch's model as in the batched one.
    def interrupt(module, args, output):
        raise _Interrupt

    hooks = [m.register_forward_hook(interrupt) for m in (a, b)]
    sn_cuda.batch(b)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    for m in (a, b):
        with pytest.raises(_Interrupt):
            m(x, y)
    for h in hooks:
        h.remove()
    train_twins(a, b)
    with torch.no_grad():  # a weight changed under no_grad shows in the next output
        for m in (a, b):
            m.eval()
            (m.head.parametrizations.weight.original if flavour == "param" else m.head.weight_orig).mul_(-3)
        assert torch.equal(a(x, y), b(x, y))


@pytest.mark.parametrize("reapplied", [False, True], ids=["removed", "removed_and_reapplied"])
@pytest.mark.parametrize("flavour", ["param", "legacy"])
def test_spectral_norm_removed_from_a_batched_layer(flavour, reapplied, monkeypatch):
    # The handle leaves such a layer alone from then on: no work for it, and a spectral norm
    # applied again is a new one, computed per layer (not iterated twice a forward).
    a, b = twin_models(flavour)
    sn_cuda.batch(b)
    train_twins(a, b, steps=1)
    for m in (a, b):
        if flavour == "legacy":
            torch.nn.utils.remove_spectral_norm(m.head)
        else:
            parametrize.remove_parametrizations(m.head, "weight")
        if reapplied:
            torch.manual_seed(5)
            sn_layers(m.head, flavour)
    batched_shapes = []
    real = ops.spectral_norm

    def recording(weights, *args, **kwargs):
        batched_shapes.extend(tuple(w.shape) for w in weights)
        return real(weights, *args, **kwargs)

    monkeypatch.setattr(ops, "spectral_norm", recording)  # torch's layers do not call it
    train_twins(a, b)  # the others still batched
    assert batched_shapes and (1, 4) not in batched_shapes  # head's weight: (1, 4)
    assert "head" not in sn_cuda.sigmas(b)


@pytest.mark.parametrize("flavour", ["param", "legacy"])
def test_settings_changed_after_batching_are_used(flavour):
    a, b = twin_models(flavour)
    handle = sn_cuda.batch(b)
    for m in (a, b):
        for sn in _sn_objects(m):  # an eps above some ‖W v‖: it shows in the numbers
            sn.n_power_iterations, sn.eps = 3, 1.0
    train_twins(a, b)
    handle.remove()


def _sn_objects(model):
    return [layer.sn for layer in spectral_norm_layers(model)]


def test_batch_of_a_layer_with_the_legacy_hook():
    # The root itself carries the hook (registered before batch's): one iteration a forward.
    torch.manual_seed(0)
    a = torch.nn.utils.spectral_norm(nn.Linear(4, 3))
    torch.manual_seed(0)
    b = torch.nn.utils.spectral_norm(nn.Linear(4, 3))
    sn_cuda.batch(b)
    x = torch.randn(2, 4)
    for _ in range(3):
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.weight_u, b.weight_u)


def test_parametrize_cached_computes_once_as_torch():
    a, b = twin_models("param")
    sn_cuda.batch(b)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    outs = []
    for m in (a, b):
        with parametrize.cached():  # two forwards, one W/σ per layer (and one iteration)
            out = m(x, y) + m(x, y)
        out.sum().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert_same_state(a, b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad), name


def test_apply_rollback_keeps_other_parametrizations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    torch.nn.utils.parametrizations.orthogonal(model[0])
    before = model[0].weight.detach().clone()
    # A weight spectral norm cannot take (integer): apply() fails on it, after model[0].
    model[1].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(Exception):
        sn_cuda.apply(model)
    assert [type(p).__name__ for p in model[0].parametrizations.weight] == ["_Orthogonal"]
    assert torch.equal(model[0].weight, before)
    assert not parametrize.is_parametrized(model[1])


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(4, 4), nn.Linear(4, 2), reentrant

    def forward(self, x):
        region = lambda t: torch.relu(self.a(t))  # noqa: E731
        return self.b(torch.utils.checkpoint.checkpoint(region, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_region_inside_a_batched_model(reentrant):
    # Documented in sn_cuda/batch.py: reentrant checkpointing gives torch's numbers; the
    # non-reentrant kind of a region inside the model raises torch's CheckpointError.
    models = []
    for batched in (False, True):
        torch.manual_seed(0)
        m = _Checkpointed(reentrant)
        for layer in (m.a, m.b):
            torch.nn.utils.parametrizations.spectral_norm(layer)
        if batched:
            sn_cuda.batch(m)
        models.append(m)
    x = torch.randn(3, 4, requires_grad=True)
    models[0](x).sum().backward()
    if not reentrant:
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            models[1](x).sum().backward()
        return
    models[1](x).sum().backward()
    for (name, pa), pb in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(pa.grad, pb.grad), name
    assert_same_state(models[0], models[1])


def test_printed_model_is_torchs_before_and_after_batching():
    # Printed models are compared (golden reprs, logs): sn_cuda's layers and a batched model
    # print as torch's.
    torch.manual_seed(0)
    torch_model, ours = sn_layers(Disc(), "mixed"), Disc()
    for m in ours.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            sn_cuda.spectral_norm(m)
    expected = repr(sn_layers(Disc(), "param"))
    assert repr(ours) == expected
    before = repr(torch_model)
    handle = sn_cuda.batch(torch_model)
    assert repr(torch_model) == before
    handle.remove()


class TwoHeads(nn.Module):
    """A body and two heads, one picked per forward (a conditional or multi-task model)."""

    def __init__(self, sn_fn):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head_a, self.head_b = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1)
        for m in (self.body, self.head_a, self.head_b):
            sn_fn(m)

    def forward(self, x, use_a=True):
        h = torch.relu(self.body(x))
        return self.head_a(h) if use_a else self.head_b(h)


@pytest.mark.parametrize("path", ["reference", "ops"])
@pytest.mark.parametrize("flavour", ["param", "legacy"])
def test_a_layer_the_forward_does_not_use_gets_no_gradient(flavour, path, monkeypatch):
    # As with torch's per-layer ops: None, not zeros, which Adam's momentum, weight decay and
    # DDP's find_unused_parameters would take for a gradient. "ops": the fused ops and their
    # C++ autograd, as CUDA tensors take them (here with the reference kernels).
    if path == "ops":
        if not sn_cuda._extension.LOADED:
            pytest.skip("needs the compiled extension (the ops' C++ autograd)")
        monkeypatch.setattr(ops, "uses_kernels", lambda weight: True)
    sn_fn = sn_cuda.spectral_norm if flavour == "param" else sn_cuda.legacy.spectral_norm
    key = "parametrizations.weight.original" if flavour == "param" else "weight_orig"
    model = TwoHeads(sn_fn)
    sn_cuda.batch(model)
    model(torch.randn(3, 4)).sum().backward()
    assert model.head_a.get_parameter(key).grad is not None
    assert model.head_b.get_parameter(key).grad is None


@pytest.mark.parametrize("flavour", ["param", "legacy"])
def test_a_raw_weight_taken_out_of_the_parameters(flavour):
    # torch.nn.utils.prune (as FSDP1's flat parameters) turns the raw weight into a plain
    # attribute that torch's flavours read by getattr: that layer computes its own, as torch.
    from torch.nn.utils import prune

    models = []
    for batched in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
        for layer in model:
            (torch.nn.utils.spectral_norm if flavour == "legacy" else torch.nn.utils.parametrizations.spectral_norm)(layer)
        if batched:
            sn_cuda.batch(model)
        owner, name = (model[0], "weight_orig") if flavour == "legacy" else (model[0].parametrizations.weight, "original")
        prune.l1_unstructured(owner, name, amount=0.5)
        models.append(model)
    x = torch.randn(3, 4)
    for _ in range(2):
        assert torch.equal(models[1](x), models[0](x))
    assert_same_state(models[1], models[0])


@pytest.mark.parametrize("path", ["reference", "ops"])
def test_frozen_layers_batched_with_trainable_ones(path, monkeypatch):
    # FreezeD (lower layers frozen), or D during G's step: a frozen layer's W/σ is a constant,
    # as from torch's own layers, though it shares a fused call with trainable ones; the
    # backward does not run through it. "ops": the fused ops and their C++ autograd.
    if path == "ops":
        if not sn_cuda._extension.LOADED:
            pytest.skip("needs the compiled extension (the ops' C++ autograd)")
        monkeypatch.setattr(ops, "uses_kernels", lambda weight: True)
    a, b = twin_models("param")
    sn_cuda.batch(b)
    seen = {}
    b.b1.c1.register_forward_hook(lambda m, args, out: seen.update(w=m.weight.requires_grad, out=out.requires_grad))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    for model in (a, b):
        model.b1.requires_grad_(False)
        model(x, y).sum().backward()
    assert seen == {"w": False, "out": False}
    for (key, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, key
        else:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=key)
