"""Shared fixtures: the layers sn_cuda must match torch on, the two flavours, twin modules.

A "twin" is a module built twice from the same RNG state, once spectral-normalized by torch
and once by sn_cuda, so that every number either can show (outputs, gradients, u and v,
state_dict entries) can be compared one to one. On CPU sn_cuda performs torch's exact op
sequence, so twins are compared with ``torch.equal``; on CUDA the fused kernels reduce in
another order, so there the comparison is to float tolerance.

Tests marked ``cuda`` need a GPU and the compiled extension; they are skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import sn_cuda
import sn_cuda.legacy

# torch.nn.utils.spectral_norm is the function; the module holding the hook class is shadowed.
_torch_hook_module = importlib.import_module("torch.nn.utils.spectral_norm")

# The tests run thousands of tiny CPU ops: on a 2-core machine, intra-op threads only contend
# (the suite runs ~4x faster on one thread). Results do not depend on it.
torch.set_num_threads(1)


# --------------------------------------------------------------------------- cuda marker
def pytest_collection_modifyitems(config, items):
    backend = sn_cuda.backend()
    if backend == "cuda":
        return
    skip = pytest.mark.skip(reason=f"needs the CUDA kernels: {backend.reason}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    return request.param


# ------------------------------------------------------------------------------ layers
@dataclasses.dataclass(frozen=True)
class Layer:
    """A module kind sn_cuda must handle, a batch for it, and the parameter to normalize."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Tensor]
    param: str = "weight"

    def make(self, device="cpu", dtype=torch.float32) -> nn.Module:
        return self.build().to(device=device, dtype=dtype)

    def input(self, device="cpu", dtype=torch.float32) -> Tensor:
        x = self.batch()
        if x.is_floating_point():
            x = x.to(dtype)
        return x.to(device)


LAYERS = [
    Layer("linear", lambda: nn.Linear(5, 7), lambda: torch.randn(3, 5)),
    Layer("conv1d_groups", lambda: nn.Conv1d(4, 6, 3, groups=2), lambda: torch.randn(2, 4, 8)),
    Layer("conv2d_groups", lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: torch.randn(2, 4, 6, 6)),
    Layer("conv3d_groups", lambda: nn.Conv3d(4, 6, 2, groups=2), lambda: torch.randn(2, 4, 4, 4, 4)),
    Layer("convtranspose1d", lambda: nn.ConvTranspose1d(4, 6, 3), lambda: torch.randn(2, 4, 5)),
    Layer("convtranspose2d_groups", lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), lambda: torch.randn(2, 4, 5, 5)),
    Layer("convtranspose3d", lambda: nn.ConvTranspose3d(4, 6, 2), lambda: torch.randn(2, 4, 3, 3, 3)),
    Layer("embedding", lambda: nn.Embedding(10, 4), lambda: torch.tensor([[1, 2, 4], [7, 2, 9]])),
    # A 1-D tensor: the parametrization flavour divides by its norm, the hook flavour runs
    # power iteration on the (n, 1) matrix.
    Layer("linear_bias", lambda: nn.Linear(5, 7), lambda: torch.randn(3, 5), param="bias"),
]


@pytest.fixture(params=LAYERS, ids=[layer.name for layer in LAYERS])
def layer(request) -> Layer:
    return request.param


# ---------------------------------------------------------------------------- flavours
@dataclasses.dataclass(frozen=True)
class Flavour:
    """One of torch's two spectral norms and sn_cuda's drop-in for it."""

    name: str
    torch_fn: Callable[..., nn.Module]
    sn_fn: Callable[..., nn.Module]

    @property
    def is_legacy(self) -> bool:
        return self.name == "legacy"

    def original_key(self, name: str = "weight") -> str:
        """The state_dict key (and qualified parameter name) of the unnormalized tensor."""
        return f"{name}_orig" if self.is_legacy else f"parametrizations.{name}.original"

    def vector_keys(self, module: nn.Module, name: str = "weight") -> list[str]:
        """The state_dict keys of u and v (none for a 1-D parametrized tensor)."""
        if self.is_legacy:
            return [f"{name}_u", f"{name}_v"]
        # Not getattr(module, name): in training that would run a power iteration.
        if module.parametrizations[name].original.ndim == 1:
            return []
        return [f"parametrizations.{name}.0._u", f"parametrizations.{name}.0._v"]

    def vectors(self, module: nn.Module, name: str = "weight") -> list[Tensor]:
        """The live u and v buffers."""
        return [module.get_buffer(key) for key in self.vector_keys(module, name)]

    def original(self, module: nn.Module, name: str = "weight") -> nn.Parameter:
        """The unnormalized parameter (what the optimizer updates)."""
        return module.get_parameter(self.original_key(name))

    def normalizer(self, module: nn.Module, name: str = "weight") -> nn.Module:
        """The object that normalizes ``name`` (it holds dim and eps): the forward pre-hook of
        the hook flavour, the parametrization of the other; torch's or sn_cuda's alike."""
        if self.is_legacy:
            (hook,) = [
                h
                for h in module._forward_pre_hooks.values()
                if isinstance(h, _torch_hook_module.SpectralNorm) and h.name == name
            ]
            return hook
        return module.parametrizations[name][0]

    def remove(self, module: nn.Module, name: str = "weight") -> nn.Module:
        if self.is_legacy:
            return sn_cuda.legacy.remove_spectral_norm(module, name)
        return parametrize.remove_parametrizations(module, name)


FLAVOURS = {
    "parametrization": Flavour(
        "parametrization", torch.nn.utils.parametrizations.spectral_norm, sn_cuda.spectral_norm
    ),
    "legacy": Flavour("legacy", torch.nn.utils.spectral_norm, sn_cuda.legacy.spectral_norm),
}


@pytest.fixture(params=list(FLAVOURS))
def flavour(request) -> Flavour:
    return FLAVOURS[request.param]


@pytest.fixture
def param_flavour() -> Flavour:
    return FLAVOURS["parametrization"]


@pytest.fixture
def legacy_flavour() -> Flavour:
    return FLAVOURS["legacy"]


@pytest.fixture
def layers() -> dict[str, Layer]:
    return {layer.name: layer for layer in LAYERS}


# --------------------------------------------------------------------------- comparing
def assert_same(actual: Tensor, expected: Tensor, msg: str = "") -> None:
    """Bit-identical on CPU (same op sequence as torch); float tolerance on CUDA."""
    if actual.device.type == "cpu" and expected.device.type == "cpu":
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
        assert torch.equal(actual, expected), (
            f"{msg}: max |diff| {(actual - expected).abs().max().item():.3g}"
        )
    else:
        precise = actual.dtype in (torch.float64, torch.complex128)
        tol = dict(rtol=1e-9, atol=1e-11) if precise else dict(rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(actual, expected, msg=msg or None, **tol)


@pytest.fixture(name="assert_same")
def assert_same_fixture():
    return assert_same


class Twins:
    """A module spectral-normalized by torch and its twin normalized by sn_cuda."""

    def __init__(self, flavour: Flavour, layer: Layer, torch_module, sn_module, device, dtype):
        self.flavour, self.layer = flavour, layer
        self.torch, self.sn = torch_module, sn_module
        self.device, self.dtype = device, dtype

    @property
    def modules(self) -> tuple[nn.Module, nn.Module]:
        return self.torch, self.sn

    def input(self) -> Tensor:
        return self.layer.input(self.device, self.dtype)

    def train(self, mode: bool = True) -> "Twins":
        for m in self.modules:
            m.train(mode)
        return self

    def assert_vectors_same(self, when: str = "") -> None:
        name = self.layer.param
        for key, t, s in zip(
            self.flavour.vector_keys(self.sn, name),
            self.flavour.vectors(self.torch, name),
            self.flavour.vectors(self.sn, name),
        ):
            assert_same(s, t, f"{key} {when}")

    def assert_state_same(self, when: str = "") -> None:
        ts, ss = self.torch.state_dict(), self.sn.state_dict()
        assert list(ss) == list(ts), when
        for key in ts:
            assert_same(ss[key], ts[key], f"state_dict[{key!r}] {when}")
        assert getattr(ss, "_metadata", None) == getattr(ts, "_metadata", None), when

    def step(self, inputs: Sequence[Tensor], training: bool, backward: bool = True) -> list[Tensor]:
        """Call both modules on each input, then run one backward through all the calls
        (D(real), D(fake), one backward). Compares the outputs, u and v after every call, and
        the gradients of every parameter and floating input. Returns sn_cuda's outputs."""
        self.train(training)
        name = self.layer.param
        runs = []  # per module: (outputs, u/v snapshots after each call, input leaves)
        for module in self.modules:
            outs, snapshots, leaves = [], [], []
            for x in inputs:
                if x.is_floating_point() or x.is_complex():
                    x = x.detach().clone().requires_grad_(backward)
                leaves.append(x)
                outs.append(module(x))
                snapshots.append([b.clone() for b in self.flavour.vectors(module, name)])
            runs.append((outs, snapshots, leaves))
        (t_outs, t_snaps, t_leaves), (s_outs, s_snaps, s_leaves) = runs
        for i, (t, s) in enumerate(zip(t_outs, s_outs)):
            assert_same(s, t, f"output of call {i} (training={training})")
            for j, (tv, sv) in enumerate(zip(t_snaps[i], s_snaps[i])):
                assert_same(sv, tv, f"{'uv'[j]} after call {i} (training={training})")
        if backward:
            cotangents = [torch.randn_like(out) for out in t_outs]
            for module, outs in zip(self.modules, (t_outs, s_outs)):
                module.zero_grad(set_to_none=True)
                sum((o * c).real.sum() for o, c in zip(outs, cotangents)).backward()
            named = zip(self.torch.named_parameters(), self.sn.named_parameters())
            for (key, tp), (_, sp) in named:
                assert (tp.grad is None) == (sp.grad is None), key
                if tp.grad is not None:
                    assert_same(sp.grad, tp.grad, f"grad of {key} (training={training})")
            for i, (tx, sx) in enumerate(zip(t_leaves, s_leaves)):
                if tx.requires_grad:
                    assert_same(sx.grad, tx.grad, f"grad of input {i} (training={training})")
        return s_outs


def make_twins(
    flavour: Flavour,
    layer: Layer,
    device="cpu",
    dtype=torch.float32,
    seed: int = 0,
    **kwargs,
) -> Twins:
    """Build ``layer`` twice from RNG seed ``seed`` and register torch's flavour on one and
    sn_cuda's on the other, from the same RNG state (u and v are drawn at registration)."""
    built = []
    for fn in (flavour.torch_fn, flavour.sn_fn):
        torch.manual_seed(seed)
        module = layer.make(device, dtype)
        torch.manual_seed(seed + 1)
        built.append(fn(module, layer.param, **kwargs))
    torch.manual_seed(seed + 2)
    return Twins(flavour, layer, *built, device, dtype)


@pytest.fixture(name="make_twins")
def make_twins_fixture():
    return make_twins
