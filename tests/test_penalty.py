"""sn_cuda.SpectralPenalty: Σ σ² against SVDs, its gradient, its buffers, its layer selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sn_cuda
import sn_cuda.legacy
from sn_cuda import reference


def make_model(dtype=torch.float64) -> nn.Module:
    # Nested names, a ConvTranspose with in != out (its matrix is dim 1), an Embedding, and a
    # BatchNorm (1-D weight: never penalized).
    model = nn.Module()
    model.body = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ConvTranspose2d(5, 4, 3))
    model.head = nn.Linear(6, 2)
    model.embed = nn.Embedding(7, 3)
    return model.to(dtype)


# name -> row dim of the matrix view
LAYERS = {"body.0": 0, "body.2": 1, "head": 0, "embed": 0}


def exact_sigma(weight: torch.Tensor, dim: int) -> float:
    return torch.linalg.matrix_norm(reference.weight_matrix(weight.detach(), dim), ord=2).item()


def test_value_and_sigmas_are_the_largest_singular_values():
    torch.manual_seed(0)
    model = make_model()
    penalty = sn_cuda.SpectralPenalty(model, n_power_iterations=200)
    value = penalty()
    exact = {name: exact_sigma(model.get_submodule(name).weight, dim) for name, dim in LAYERS.items()}
    sigmas = penalty.sigmas()
    assert list(sigmas) == list(LAYERS)
    for name in LAYERS:
        assert sigmas[name] == pytest.approx(exact[name], rel=1e-9), name
    assert value.item() == pytest.approx(sum(s * s for s in exact.values()), rel=1e-9)
    assert value.dim() == 0 and value.dtype == torch.float64


def test_gradient_is_two_sigma_u_vT():
    torch.manual_seed(0)
    model = make_model()
    penalty = sn_cuda.SpectralPenalty(model)
    penalty()  # one training step, then eval: the vectors stay as they are
    penalty.eval()
    penalty().backward()
    sigmas = penalty.sigmas()
    for name, dim in LAYERS.items():
        weight = model.get_submodule(name).weight
        vectors = penalty.vectors.get_submodule(name)
        u, v = vectors.weight_u, vectors.weight_v
        moved = reference.weight_matrix(weight, dim).shape
        expected = (2 * sigmas[name] * torch.outer(u, v)).reshape(
            (moved[0],) + tuple(s for i, s in enumerate(weight.shape) if i != dim)
        ).movedim(0, dim)
        torch.testing.assert_close(weight.grad, expected, msg=name)


def test_gradient_after_convergence_is_the_top_singular_pair():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).double()
    penalty = sn_cuda.SpectralPenalty(linear, n_power_iterations=200)
    penalty().backward()
    U, S, Vh = torch.linalg.svd(linear.weight.detach())
    torch.testing.assert_close(linear.weight.grad, 2 * S[0] * torch.outer(U[:, 0], Vh[0]))
    assert linear.bias.grad is None


def test_state_dict_holds_only_the_vectors_and_round_trips():
    torch.manual_seed(0)
    model = make_model()
    a = sn_cuda.SpectralPenalty(model, n_power_iterations=3)
    a()
    state = a.state_dict()
    assert list(state) == [f"vectors.{name}.weight_{x}" for name in LAYERS for x in "uv"]
    assert state["vectors.body.2.weight_u"].shape == (4,)  # ConvTranspose: rows = out channels
    assert state["vectors.body.2.weight_v"].shape == (5 * 3 * 3,)
    assert list(a.parameters()) == []
    torch.manual_seed(1)
    b = sn_cuda.SpectralPenalty(model, n_power_iterations=3)
    b.load_state_dict(state)
    for key, value in b.state_dict().items():
        assert torch.equal(value, state[key]), key
    a.eval(), b.eval()
    assert torch.equal(a(), b())


def test_initialization_is_deterministic():
    model = make_model()
    states = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        states.append(sn_cuda.SpectralPenalty(model).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_training_updates_vectors_and_eval_keeps_them():
    torch.manual_seed(0)
    penalty = sn_cuda.SpectralPenalty(make_model())
    before = {k: v.clone() for k, v in penalty.state_dict().items()}
    penalty.eval()
    penalty()
    assert all(torch.equal(v, before[k]) for k, v in penalty.state_dict().items())
    penalty.train()
    penalty()
    assert not any(torch.equal(v, before[k]) for k, v in penalty.state_dict().items())


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (None, None, list(LAYERS)),
        (nn.Linear, None, ["head"]),
        ("body.*", None, ["body.0", "body.2"]),
        ([nn.Embedding, "head"], None, ["head", "embed"]),
        (None, nn.Embedding, ["body.0", "body.2", "head"]),
        (None, ["body.2", "head"], ["body.0", "embed"]),
        ("body.*", nn.ConvTranspose2d, ["body.0"]),
        ("*", None, list(LAYERS)),  # matches the BatchNorm too: its 1-D weight is skipped
    ],
)
def test_include_and_exclude(include, exclude, expected):
    penalty = sn_cuda.SpectralPenalty(make_model(), include=include, exclude=exclude)
    assert list(penalty.sigmas()) == expected


def test_selection_errors():
    with pytest.raises(ValueError, match="no weight of 2 or more dims selected"):
        sn_cuda.SpectralPenalty(make_model(), include="nothing.*")
    with pytest.raises(TypeError, match="include must hold module types or name patterns"):
        sn_cuda.SpectralPenalty(make_model(), include=[3])
    with pytest.raises(ValueError, match="n_power_iterations"):
        sn_cuda.SpectralPenalty(make_model(), n_power_iterations=0)
    with pytest.raises(ValueError, match="uninitialized weight"):
        sn_cuda.SpectralPenalty(nn.Sequential(nn.LazyLinear(3)))


def test_spectral_normalized_layers_contribute_their_raw_weight():
    """σ of the normalized weight is ≈ 1 by construction; the penalty is on the raw one."""
    torch.manual_seed(0)
    model = nn.Sequential(
        torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 5)),
        torch.nn.utils.spectral_norm(nn.Linear(5, 6)),
        sn_cuda.spectral_norm(nn.Conv2d(2, 3, 3)),
        sn_cuda.legacy.spectral_norm(nn.ConvTranspose1d(3, 2, 3)),
        sn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3), (5, 5)),
    ).double()
    raw = [
        model[0].parametrizations.weight.original,
        model[1].weight_orig,
        model[2].parametrizations.weight.original,
        model[3].weight_orig,
        model[4].parametrizations.weight.original,
    ]
    dims = [0, 0, 0, 1, 0]
    penalty = sn_cuda.SpectralPenalty(model, n_power_iterations=200)
    penalty().backward()
    for i, (weight, dim) in enumerate(zip(raw, dims)):
        assert penalty.sigmas()[str(i)] == pytest.approx(exact_sigma(weight, dim), rel=1e-9)
        assert weight.grad is not None and weight.grad.abs().sum() > 0


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_other_parametrizations_contribute_the_parametrized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).double()
    parametrize.register_parametrization(linear, "weight", Doubled())
    penalty = sn_cuda.SpectralPenalty(linear, n_power_iterations=200)
    penalty().backward()
    original = linear.parametrizations.weight.original
    assert penalty.sigmas()[""] == pytest.approx(2 * exact_sigma(original, 0), rel=1e-9)
    assert original.grad is not None


def test_model_is_held_outside_the_module_tree():
    model = make_model(torch.float32)
    penalty = sn_cuda.SpectralPenalty(model)
    assert penalty.model is model
    assert "model" not in dict(penalty.named_children())
    penalty.eval()
    assert model.training  # penalty.eval() leaves the model alone
    # The vectors follow their weights when the model moves to another dtype (or device).
    model.double()
    value = penalty()
    assert value.dtype == torch.float64
    assert all(b.dtype == torch.float64 for b in penalty.buffers())


@pytest.mark.cuda
def test_kernels_match_the_reference_path():
    """On CUDA the layers go through the fused op; the result equals the CPU reference path."""
    torch.manual_seed(0)
    cpu_model = make_model(torch.float32)
    cuda_model = make_model(torch.float32)
    cuda_model.load_state_dict(cpu_model.state_dict())
    penalties = []
    for model in (cpu_model, cuda_model):
        torch.manual_seed(1)  # same initial vectors, drawn on the CPU
        penalties.append(sn_cuda.SpectralPenalty(model, n_power_iterations=2))
    cpu_penalty, cuda_penalty = penalties
    cuda_model.cuda()  # its vectors follow on the first call
    assert sn_cuda.ops.uses_kernels(cuda_model.head.weight)
    for _ in range(2):
        cpu_value, cuda_value = cpu_penalty(), cuda_penalty()
        cpu_value.backward(), cuda_value.backward()
        torch.testing.assert_close(cuda_value.cpu(), cpu_value, rtol=1e-4, atol=1e-5)
    for key, value in cpu_penalty.state_dict().items():
        torch.testing.assert_close(cuda_penalty.state_dict()[key].cpu(), value, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(cpu_model.named_parameters(), cuda_model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_spectral_norm_added_after_the_penalty_is_seen():
    # The penalized tensor is looked up at every call: once the layer gets spectral norm, its
    # raw weight (σ(W/σ) ≈ 1 would penalize nothing), and the layer's own u, v stay untouched.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6)).double()
    penalty = sn_cuda.SpectralPenalty(model, n_power_iterations=200)
    sn_cuda.spectral_norm(model[0])
    sn_cuda.legacy.spectral_norm(model[1])
    vectors = [model[0].parametrizations.weight[0]._u.clone(), model[1].weight_u.clone()]
    penalty()
    raw = [model[0].parametrizations.weight.original, model[1].weight_orig]
    for i, weight in enumerate(raw):
        assert penalty.sigmas()[str(i)] == pytest.approx(exact_sigma(weight, 0), rel=1e-9)
    assert torch.equal(model[0].parametrizations.weight[0]._u, vectors[0])
    assert torch.equal(model[1].weight_u, vectors[1])


def test_a_weight_shared_by_two_modules_counts_once():
    # Tied input and output embeddings: one parameter to torch, one σ² here.
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)}).double()
    model["head"].weight = model["emb"].weight
    penalty = sn_cuda.SpectralPenalty(model, n_power_iterations=200)
    value = penalty()
    sigma = exact_sigma(model["emb"].weight, 0)
    assert list(penalty.sigmas()) == ["emb"]
    assert value.item() == pytest.approx(sigma**2, rel=1e-9)
