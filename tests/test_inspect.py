"""``python -m sn_cuda inspect``: checkpoints of every flavour, their σ, and the error paths."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import sn_cuda
import sn_cuda.legacy
from sn_cuda.inspect import add_exact, find_layers, load_state_dict, main

# name -> (flavour reported, module builder, a batch for it)
LAYERS = {
    "conv": ("parametrization", lambda: torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)), (2, 3, 6, 6)),
    "up": ("legacy", lambda: torch.nn.utils.spectral_norm(nn.ConvTranspose2d(4, 6, 3)), (2, 4, 4, 4)),
    "fc": ("parametrization", lambda: sn_cuda.spectral_norm(nn.Linear(5, 7)), (2, 5)),
    "old": ("legacy", lambda: sn_cuda.legacy.spectral_norm(nn.Conv1d(2, 3, 3)), (2, 2, 6)),
    "convop": ("conv-operator", lambda: sn_cuda.conv_spectral_norm(nn.Conv2d(2, 3, 3), (5, 5)), (2, 2, 5, 5)),
    "plain": ("plain", lambda: nn.Linear(4, 3), (2, 4)),
    "norm": (None, lambda: nn.BatchNorm1d(3), (2, 3)),  # 1-D weight: not a layer here
}
REPORTED = [name for name, (flavour, _, _) in LAYERS.items() if flavour]


@pytest.fixture(scope="module")
def model() -> nn.ModuleDict:
    """Every flavour, each layer run a few times in training mode then once in eval mode."""
    torch.manual_seed(0)
    model = nn.ModuleDict({name: make() for name, (_, make, _) in LAYERS.items()})
    for mode in (True, True, True, False):
        model.train(mode)
        for name, (_, _, shape) in LAYERS.items():
            model[name](torch.randn(shape))
    return model


def raw_weight(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "parametrizations"):
        return module.parametrizations.weight.original
    return getattr(module, "weight_orig", module.weight)


def stored_sigma(module: nn.Module) -> float:
    """σ the module itself divides by in eval mode (from its stored u, v): W_raw / W_sn."""
    raw = raw_weight(module)
    return (raw.norm() / module.weight.norm()).item()


def top_singular_value(weight: torch.Tensor, dim: int) -> float:
    mat = weight.detach().double().transpose(0, dim).reshape(weight.shape[dim], -1)
    return torch.linalg.svdvals(mat)[0].item()


def test_find_layers(model):
    reports = find_layers(model.state_dict())
    assert [r.name for r in reports] == REPORTED
    for r in reports:
        module = model[r.name]
        assert r.flavour == LAYERS[r.name][0], r.name
        assert r.shape == tuple(raw_weight(module).shape)
        if r.flavour in ("parametrization", "legacy"):
            assert r.sigma == pytest.approx(stored_sigma(module), rel=1e-5), r.name
        else:
            assert r.sigma is None, r.name
    assert {r.name: r.dim for r in reports}["up"] == 1  # ConvTranspose: rows are dim 1
    add_exact(reports)
    for r in reports:
        if r.flavour == "conv-operator":  # the convolution's norm: not from a checkpoint
            assert r.exact is None
            continue
        expected = top_singular_value(raw_weight(model[r.name]), 1 if r.name == "up" else 0)
        assert r.exact == pytest.approx(expected, rel=1e-9), r.name


@pytest.mark.parametrize(
    "wrap, prefix",
    [
        (lambda sd: sd, ""),
        (lambda sd: {"state_dict": sd, "epoch": 3}, ""),
        (lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}}, ""),
        (lambda sd: {"D": sd, "step": 10}, "D."),
    ],
    ids=["state_dict", "state_dict_key", "model_key", "nested"],
)
def test_checkpoint_layouts(model, tmp_path, wrap, prefix):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(model.state_dict()), path)
    names = [r.name for r in find_layers(load_state_dict(str(path)))]
    assert names == [prefix + name for name in REPORTED]


def test_cli_table(model, tmp_path, capsys):
    path = tmp_path / "d.pt"
    torch.save(model.state_dict(), path)
    assert main([str(path), "--exact"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"{path}: {len(REPORTED)} layers"
    assert lines[1].split() == ["layer", "flavour", "shape", "sigma", "(u,", "v)", "sigma", "(exact)"]
    reports = find_layers(model.state_dict())
    add_exact(reports)
    for line, r in zip(lines[2:], reports):
        sigma = "-" if r.sigma is None else f"{r.sigma:.6g}"
        exact = "-" if r.exact is None else f"{r.exact:.6g}"
        assert line.split() == [r.name, r.flavour, "x".join(map(str, r.shape)), sigma, exact]
    estimated = [r.sigma for r in reports if r.sigma is not None]
    exacts = [r.exact for r in reports if r.exact is not None]
    product = lines[2 + len(reports)].split()
    assert product == ["product", f"{math.prod(estimated):.6g}", f"{math.prod(exacts):.6g}"]
    assert f"over the {len(estimated)} of {len(reports)} layers" in lines[-1]


def test_cli_without_exact(model, tmp_path, capsys):
    path = tmp_path / "d.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "sigma (exact)" not in out
    assert out.splitlines()[2].split()[0] == "conv"


def _garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    return path


def _no_weights(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"epoch": 3, "bias": torch.zeros(4), "step": torch.tensor(2)}, path)
    return path


def _pickled_object(tmp_path):
    path = tmp_path / "with_args.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {"fc.weight": torch.randn(3, 2)}}, path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp_path: tmp_path / "missing.pt", "no such file"),
        (lambda tmp_path: tmp_path, "is a directory"),
        (_garbage, "cannot read it as a torch checkpoint"),
        (_empty, "is empty"),
        (_no_weights, "holds no layer weights"),
        (_pickled_object, "argparse.Namespace objects.*--trust"),
    ],
    ids=["missing", "directory", "garbage", "empty", "no_weights", "needs_trust"],
)
def test_cli_errors(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_trust_loads_pickled_objects(tmp_path, capsys):
    assert main([str(_pickled_object(tmp_path)), "--trust"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:3] == ["fc", "plain", "3x2"]


def test_usage_error_returns_2(capsys):
    assert main([]) == 2
    assert "PATH" in capsys.readouterr().err


def test_python_dash_m(model, tmp_path):
    path = tmp_path / "d.pt"
    torch.save(model.state_dict(), path)
    run = subprocess.run(
        [sys.executable, "-m", "sn_cuda", "inspect", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == f"{path}: {len(REPORTED)} layers"


def _exact_sigma(weight, dim):
    w = weight.detach().double()
    return torch.linalg.matrix_norm(w.movedim(dim, 0).reshape(w.shape[dim], -1), ord=2).item()


@pytest.mark.parametrize("sn_fn", [torch.nn.utils.spectral_norm, torch.nn.utils.parametrizations.spectral_norm])
def test_the_matrix_view_is_the_one_the_vectors_belong_to(sn_fn):
    # A square ConvTranspose2d kernel: u, v fit both dim 0 and dim 1. After one step of power
    # iteration the vectors are a pair of dim 1's view only (the hook flavour's random start
    # would otherwise pick a view at random).
    for seed in range(5):
        torch.manual_seed(seed)
        layer = sn_fn(nn.ConvTranspose2d(8, 8, 4))
        layer(torch.randn(1, 8, 5, 5))
        (report,) = find_layers(layer.state_dict())
        add_exact([report])
        assert report.dim == 1 and not report.dim_assumed
        original = layer.weight_orig if hasattr(layer, "weight_orig") else layer.parametrizations.weight.original
        assert report.exact == pytest.approx(_exact_sigma(original, 1), rel=1e-9)


def test_never_iterated_vectors_say_the_view_is_assumed(tmp_path, capsys):
    torch.manual_seed(0)
    layer = torch.nn.utils.spectral_norm(nn.ConvTranspose2d(8, 8, 4))  # saved before any forward
    (report,) = find_layers(layer.state_dict())
    assert report.dim == 0 and report.dim_assumed
    path = tmp_path / "fresh.pt"
    torch.save(layer.state_dict(), path)
    assert main([str(path)]) == 0
    assert "taken on dim 0" in capsys.readouterr().out


def test_exact_of_non_finite_and_empty_weights(tmp_path, capsys):
    # A diverged GAN's checkpoint still gets its table: nan where the weight is not finite.
    state = {"a.weight": torch.full((3, 4), float("nan")), "b.weight": torch.zeros(0, 3), "c.weight": torch.eye(2)}
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    assert main([str(path), "--exact"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:5]}
    assert rows["a"][-1] == "nan" and rows["b"][-1] == "0" and rows["c"][-1] == "1"
