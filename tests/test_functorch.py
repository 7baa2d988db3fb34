"""torch.func on spectral-normalized models: functional_call, grad, vjp, as with torch's SN.

functorch cannot differentiate through a C++ ``torch::autograd::Function`` (normalize's
autograd in csrc/autograd.cpp); inside a torch.func transform sn_cuda takes the reference
path, which is plain torch ops (sn_cuda.ops.spectral_norm). On the CPU that path is taken
anyway: there the tests check the numbers; tests/cuda_emu/module_parity.py and the ``cuda``
run check that the kernel path steps aside.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vjp

import sn_cuda


def _model(sn_fn, device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(6 * 4 * 4, 2))
    torch.manual_seed(1)
    for i in (0, 3):
        sn_fn(model[i])
    return model.to(device)


@pytest.mark.parametrize("batched", [False, True], ids=["per-layer", "batched"])
def test_grad_of_functional_call_matches_torch(device, flavour, assert_same, batched):
    ref, ours = _model(flavour.torch_fn, device), _model(flavour.sn_fn, device)
    handle = sn_cuda.batch(ours) if batched else None
    x = torch.randn(5, 3, 6, 6, device=device)
    # Other weights than the modules': functional_call must normalize what it is given.
    params = {k: 2 * p.detach() for k, p in ref.named_parameters()}

    def loss(p, model, buffers):
        return functional_call(model, {**p, **buffers}, (x,)).square().sum()

    results = []
    for model in (ref, ours):
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        results.append((grad(loss)(params, model, buffers), buffers))
    (g_ref, b_ref), (g_ours, b_ours) = results
    assert list(g_ours) == list(g_ref)
    for key in g_ref:
        assert_same(g_ours[key], g_ref[key], f"grad of {key}")
    for key in b_ref:  # the power iteration ran on the buffers handed in, as torch's does
        assert_same(b_ours[key], b_ref[key], f"buffer {key}")
    if handle is not None:
        handle.remove()


def test_vjp_with_respect_to_the_input(device, flavour, assert_same):
    """A gradient penalty's shape: d D(x) / dx, with the weights as they are."""
    ref, ours = _model(flavour.torch_fn, device), _model(flavour.sn_fn, device)
    x = torch.randn(5, 3, 6, 6, device=device)
    (out_ref, pull_ref), (out_ours, pull_ours) = vjp(ref, x), vjp(ours, x)
    assert_same(out_ours, out_ref, "output")
    cotangent = torch.randn_like(out_ref)
    assert_same(pull_ours(cotangent)[0], pull_ref(cotangent)[0], "vjp")
    for t, s in zip(ref.buffers(), ours.buffers()):
        assert_same(s, t, "u/v after the call")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batched", [False, True], ids=["per-layer", "batched"])
def test_compiled_grad_of_functional_call_matches_eager(batched, training):
    # torch.compile traces the transform: sn_cuda takes the reference there too (functorch
    # cannot differentiate the fused ops), and keeps no σ from inside it (a wrapper tensor,
    # which compile cannot hand back as module state). The hook flavour's module.weight is
    # such state: torch's, like sn_cuda's, does not compile here.
    torch._dynamo.reset()
    model = _model(sn_cuda.spectral_norm, "cpu").train(training)
    if batched:
        sn_cuda.batch(model)
    model(torch.randn(5, 3, 6, 6))
    sigmas = sn_cuda.sigmas(model)
    x = torch.randn(5, 3, 6, 6)
    params = {k: 2 * p.detach() for k, p in model.named_parameters()}

    def loss(p, buffers):
        return functional_call(model, {**p, **buffers}, (x,)).square().sum()

    buffers = [{k: b.clone() for k, b in model.named_buffers()} for _ in range(2)]
    compiled = torch.compile(grad(loss), backend="aot_eager", fullgraph=True)(params, buffers[0])
    eager = grad(loss)(params, buffers[1])
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in buffers[1]:
        torch.testing.assert_close(buffers[0][key], buffers[1][key], rtol=1e-5, atol=1e-6, msg=key)
    assert sn_cuda.sigmas(model) == sigmas  # those of the model's own last forward


@pytest.mark.parametrize("path", ["reference", "ops"])
def test_forward_mode_ad_in_eval(path, monkeypatch):
    # torch.autograd.forward_ad with a tangent on the weight (torch's flavour supports it in
    # eval): the fused ops' C++ autograd has no jvp, so the reference computes there.
    import torch.autograd.forward_ad as fwAD

    if path == "ops":
        if not sn_cuda._extension.LOADED:
            pytest.skip("needs the compiled extension (the ops' C++ autograd)")
        monkeypatch.setattr(sn_cuda.ops, "uses_kernels", lambda weight: True)
    x = torch.randn(2, 4)
    tangents = []
    for sn_fn in (torch.nn.utils.parametrizations.spectral_norm, sn_cuda.spectral_norm):
        torch.manual_seed(0)
        model = sn_fn(nn.Linear(4, 3)).eval()
        plist = model.parametrizations.weight
        weight = plist.original.detach()
        with fwAD.dual_level():
            del plist._parameters["original"]
            plist.original = fwAD.make_dual(weight, torch.ones_like(weight))
            tangents.append(fwAD.unpack_dual(model(x)).tangent)
    torch.testing.assert_close(tangents[1], tangents[0])
