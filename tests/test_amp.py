"""Mixed precision: autocast, and float16/bfloat16 weights.

The contract (DESIGN.md, Numerics):

* autocast does not reach sn_cuda's arithmetic: with float32 weights, u, v and σ are float32
  and bit-identical to a run without autocast (torch's flavours run ``torch.mv`` in float16
  under CUDA autocast — it is on autocast's lower-precision list); only what the model does
  with W/σ is cast;
* float16/bfloat16 weights: power iteration, the normalizations, σ and W/σ run in float32 and
  W/σ is rounded once; u and v keep the weight's dtype (state_dict keys and dtypes equal to
  torch's half model, so checkpoints stay interchangeable); σ is float32;
* no NaN/Inf where torch's float32 result (on the same rounded weights) is finite. torch's
  own half arithmetic is not that: with ‖W v‖ above 65504 its float16 normalization divides by
  inf and W/σ becomes NaN/Inf (pytorch#61954 is the underflow side of the same thing).
"""

import copy

import pytest
import torch
from torch import nn

import sn_cuda
import sn_cuda.legacy
from sn_cuda import ops, reference

SN = {"legacy": sn_cuda.legacy.spectral_norm, "param": sn_cuda.spectral_norm}
TORCH_SN = {
    "legacy": torch.nn.utils.spectral_norm,
    "param": torch.nn.utils.parametrizations.spectral_norm,
}
# Relative error allowed against float32, measured against each tensor's largest entry.
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def base_model(scale: float = 1.0, constant: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.LeakyReLU(0.2), nn.Linear(32, 8))
    with torch.no_grad():
        if constant:  # every entry equal (one perturbed): ‖W v‖ and σ far above 65504
            model[0].weight.fill_(scale)
            model[0].weight[0, 0] = 0.9 * scale
        else:
            model[0].weight.mul_(scale)
    return model


def spectral_normalized(model, sn_fn, batched, device, dtype):
    torch.manual_seed(1)  # u and v are drawn at registration: the same for every twin
    for i in (0, 2):
        sn_fn(model[i])
    model = model.to(device)
    model = model.to(dtype)
    if batched:
        sn_cuda.batch(model)
    return model


def vectors(model, flavour):
    keys = ("weight_u", "weight_v") if flavour == "legacy" else (
        "parametrizations.weight.0._u", "parametrizations.weight.0._v")
    return [m.get_buffer(k) for m in (model[0], model[2]) for k in keys]


def originals(model, flavour):
    key = "weight_orig" if flavour == "legacy" else "parametrizations.weight.original"
    return [m.get_parameter(key) for m in (model[0], model[2])]


def torch_sigmas(model, flavour):
    """σ = u·W v from a torch model's (updated) buffers, in float64."""
    out = []
    for w, (u, v) in zip(originals(model, flavour), zip(*[iter(vectors(model, flavour))] * 2)):
        mat = w.detach().double().reshape(w.shape[0], -1)
        out.append(torch.vdot(u.double(), mat @ v.double()).item())
    return out


def assert_near(actual, expected, tol, what):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(expected).all(), f"{what}: the float32 reference itself is not finite"
    assert torch.isfinite(actual).all(), f"{what}: NaN/Inf where float32 is finite"
    err = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
    assert err <= tol, f"{what}: relative error {err.item():.3g} > {tol}"


def test_no_autocast_turns_autocast_off_only_where_it_is_on():
    a, b = torch.randn(4, 5), torch.randn(5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(a, b).dtype == torch.bfloat16  # mm is on CPU autocast's list
        with reference.no_autocast(a.device):
            assert torch.mm(a, b).dtype == torch.float32
        assert torch.mm(a, b).dtype == torch.bfloat16
    with reference.no_autocast(torch.device("meta")):  # no autocast for meta: a no-op
        assert torch.mm(a, b).dtype == torch.float32


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_autocast_leaves_sn_in_float32(flavour, batched, amp_dtype, device):
    check_autocast_leaves_sn_in_float32(flavour, batched, amp_dtype, device)


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_autocast_on_the_reference_path_cuda(flavour, batched, amp_dtype, monkeypatch):
    # CUDA autocast casts matvecs to half precision (CPU autocast does not, and the kernels
    # ignore autocast): this is where the reference must run its own ops outside autocast.
    monkeypatch.setattr(ops, "uses_kernels", lambda weight: False)
    check_autocast_leaves_sn_in_float32(flavour, batched, amp_dtype, "cuda")


def check_autocast_leaves_sn_in_float32(flavour, batched, amp_dtype, device):
    # Large constant weights: a float16 matvec of them overflows (σ ≈ 1.2e5).
    plain = spectral_normalized(base_model(3000.0, constant=True), SN[flavour], batched, device, torch.float32)
    amp = copy.deepcopy(plain)
    x = torch.randn(4, 48, device=device)
    for step in range(2):
        out_plain = plain(x)
        with torch.autocast(device, dtype=amp_dtype):
            out_amp = amp(x)
        assert out_amp.dtype == amp_dtype  # the layers themselves are autocast
        assert torch.isfinite(out_amp.float()).all()
        for a, p in zip(vectors(amp, flavour), vectors(plain, flavour)):
            assert a.dtype == torch.float32
            assert torch.equal(a, p), f"u/v moved under autocast at step {step}"
        sig_amp, sig_plain = sn_cuda.sigmas(amp), sn_cuda.sigmas(plain)
        assert sig_amp == sig_plain and sig_amp["0"] > 65504
        if flavour == "legacy":  # the W/σ the layer read: float32, as without autocast
            assert amp[0].weight.dtype == torch.float32
            assert torch.equal(amp[0].weight, plain[0].weight)
        out_amp.float().sum().backward()
        out_plain.sum().backward()
        for p in originals(amp, flavour):
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def _half_twins(flavour, batched, device, dtype, **model_kwargs):
    """sn_cuda on a half model, torch's on the same model in half (its checkpoint), and
    torch's on the same rounded weights and vectors in float32 (the reference)."""
    base = base_model(**model_kwargs)
    ours = spectral_normalized(copy.deepcopy(base), SN[flavour], batched, device, dtype)
    torch_half = spectral_normalized(copy.deepcopy(base), TORCH_SN[flavour], False, device, dtype)
    ref = copy.deepcopy(torch_half).float()
    return ours, torch_half, ref


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float16, s) for s in (1e-4, 1.0, 1e3)] + [(torch.bfloat16, s) for s in (1e-5, 1.0, 1e15)],
    ids=lambda p: str(p).replace("torch.", ""),
)
@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_half_weights_compute_in_float32(flavour, batched, dtype, scale, device):
    ours, torch_half, ref = _half_twins(flavour, batched, device, dtype, scale=scale)
    # Checkpoints are interchangeable with torch's half model: same keys, dtypes, shapes.
    theirs = torch_half.state_dict()
    assert {k: (v.dtype, v.shape) for k, v in ours.state_dict().items()} == {
        k: (v.dtype, v.shape) for k, v in theirs.items()
    }
    tol = TOL[dtype]
    for step in range(2):
        x = torch.randn(4, 48, device=device)
        out, out_ref = ours(x.to(dtype)), ref(x)
        assert out.dtype == dtype
        assert_near(out, out_ref, 2 * tol, f"output, step {step}")
        for i, (a, r) in enumerate(zip(vectors(ours, flavour), vectors(ref, flavour))):
            assert a.dtype == dtype
            assert_near(a, r, tol, f"vector {i}, step {step}")
        sigmas = sn_cuda.sigmas(ours)
        for name, expected in zip(("0", "2"), torch_sigmas(ref, flavour)):
            assert abs(sigmas[name] - expected) <= tol * abs(expected), f"sigma of {name}"
        last = ours[0].parametrizations.weight[0].last_sigma if flavour == "param" else next(
            iter(ours[0]._forward_pre_hooks.values())).last_sigma
        assert last[0].dtype == torch.float32
        out.float().square().sum().backward()
        out_ref.square().sum().backward()
        for i, (p, r) in enumerate(zip(originals(ours, flavour), originals(ref, flavour))):
            assert p.grad.dtype == dtype
            assert_near(p.grad, r.grad, 4 * tol, f"grad {i}, step {step}")
            p.grad = r.grad = None


@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_float16_where_half_arithmetic_overflows(flavour, batched, device):
    # σ ≈ 1.2e5 > 65504: float16 normalization divides by inf (torch's float16 flavours give
    # NaN/Inf here). In float32 everything is finite; so must sn_cuda's float16 result be.
    ours, _, ref = _half_twins(flavour, batched, device, torch.float16, scale=3000.0, constant=True)
    x = torch.randn(4, 48, device=device)
    out, out_ref = ours(x.half()), ref(x)
    assert_near(out, out_ref, 4e-3, "output")
    for i, (a, r) in enumerate(zip(vectors(ours, flavour), vectors(ref, flavour))):
        assert_near(a, r, 2e-3, f"vector {i}")
    assert sn_cuda.sigmas(ours)["0"] > 65504  # σ itself does not fit in float16
    out.float().sum().backward()
    assert torch.isfinite(originals(ours, flavour)[0].grad).all()


@pytest.mark.parametrize("flavour", ["legacy", "param"])
def test_registered_on_a_float16_model(flavour, device):
    # A model built in half, or given spectral norm after .half(): torch's parametrization runs
    # its 15 initial steps in float16, where ‖W v‖ > 65504 leaves u, v NaN for good. sn_cuda's
    # run in float32, from torch's own float16 draws.
    ours = base_model(3000.0, constant=True).to(device, torch.float16)
    torch.manual_seed(1)
    for i in (0, 2):
        SN[flavour](ours[i])
    # The vectors float32 arithmetic gives from the same draws (drawn and normalized in
    # float16, as torch does): the parametrization flavour then iterates 15 times, and once
    # more in register_parametrization's check (training mode).
    expected = []
    torch.manual_seed(1)
    for i in (0, 2):
        rows, cols = ours[i].out_features, ours[i].in_features
        u, v = (
            nn.functional.normalize(torch.empty(n, device=device, dtype=torch.float16).normal_(0, 1), dim=0)
            for n in (rows, cols)
        )
        u, v = u.float(), v.float()
        if flavour == "param":
            mat = originals(ours, flavour)[i // 2].detach().float()
            reference.power_iteration(mat, u, v, True, 16, 1e-12)
        expected += [u, v]
    for i, (a, e) in enumerate(zip(vectors(ours, flavour), expected)):
        assert a.dtype == torch.float16
        assert_near(a, e, 2e-3, f"vector {i} after registration")
    # A training step from there: what torch's float32 model does from the same vectors.
    ref = base_model(3000.0, constant=True).to(device, torch.float16).float()
    for i in (0, 2):
        TORCH_SN[flavour](ref[i])
    with torch.no_grad():
        for r, a in zip(vectors(ref, flavour), vectors(ours, flavour)):
            r.copy_(a)
    x = torch.randn(4, 48, device=device)
    assert_near(ours(x.half()), ref(x), 4e-3, "output")
