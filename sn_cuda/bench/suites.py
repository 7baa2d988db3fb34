"""Benchmark suites: lists of spectral-normalized layer shapes, built as real nn.Modules.

The model suites come from ``sn_cuda/data/model_shapes.json`` (the SN layer shapes of public
GAN/vocoder models, with the repository each was read from); the synthetic ones are defined
here. A suite is built as ``SuiteModel``: a ModuleList of real Conv/Linear/Embedding modules
(right weight shapes, no bias) whose ``forward`` returns the layer's weight instead of applying
it. Calling the model therefore runs exactly what spectral norm costs in a training step —
every normalized weight, through each flavour's own machinery (the hook flavour's forward
pre-hook, the parametrization's ``weight`` property, ``sn_cuda.batch``'s hook on the root) —
and nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

__all__ = [
    "LayerSpec", "Suite", "SuiteModel", "STANDARD", "all_suites", "get_suite", "build", "make_layer",
]

# What `python -m sn_cuda bench` runs with no --suite (DESIGN.md's baseline suites).
STANDARD = ("sngan_cifar_resnet_d", "biggan128_d", "many_small", "linear4096")


@dataclass(frozen=True)
class LayerSpec:
    name: str
    kind: str  # "linear", "embedding", "conv1d", "conv2d" or "conv_transpose2d"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    source: str
    layers: tuple[LayerSpec, ...]

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def standard(self) -> bool:
        return self.name in STANDARD


# ------------------------------------------------------------------------- the layer modules
class _WeightOnly:
    """Mixin placed before an nn.Module class: the module's forward returns its (normalized)
    weight. Keeps the real class, so torch's and sn_cuda's type checks (ConvTranspose → dim 1,
    ``sn_cuda.apply``'s module types) see what a model would show them."""

    def forward(self, *args):
        return self.weight


class LinearWeight(_WeightOnly, nn.Linear):
    pass


class EmbeddingWeight(_WeightOnly, nn.Embedding):
    pass


class Conv1dWeight(_WeightOnly, nn.Conv1d):
    pass


class Conv2dWeight(_WeightOnly, nn.Conv2d):
    pass


class ConvTranspose2dWeight(_WeightOnly, nn.ConvTranspose2d):
    pass


def make_layer(spec: LayerSpec) -> nn.Module:
    s = spec.shape
    if spec.kind == "linear":
        return LinearWeight(s[1], s[0], bias=False)
    if spec.kind == "embedding":
        return EmbeddingWeight(s[0], s[1])
    if spec.kind == "conv1d":
        return Conv1dWeight(s[1], s[0], s[2], bias=False)
    if spec.kind == "conv2d":
        return Conv2dWeight(s[1], s[0], tuple(s[2:]), bias=False)
    if spec.kind == "conv_transpose2d":  # weight (in, out, kh, kw)
        return ConvTranspose2dWeight(s[0], s[1], tuple(s[2:]), bias=False)
    raise ValueError(f"unknown layer kind {spec.kind!r}")


class SuiteModel(nn.Module):
    """The layers of one suite; ``forward()`` returns the list of their normalized weights."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self) -> list[torch.Tensor]:
        return [layer() for layer in self.layers]


def build(suite: Suite, device, dtype: torch.dtype, seed: int = 0) -> SuiteModel:
    """The suite's layers on ``device`` in ``dtype``, weights ~ N(0, 1/cols), no SN yet
    (the same values for every method on one device).

    Built on the meta device first, so a 90M-parameter suite costs one fill, not a
    Kaiming initialisation per layer."""
    with torch.device("meta"):
        model = SuiteModel([make_layer(spec) for spec in suite.layers])
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: no host fill + copy
    with torch.no_grad():
        for p in model.parameters():
            cols = p.numel() // p.shape[0]
            p.normal_(0.0, cols ** -0.5, generator=gen)
    return model


# ------------------------------------------------------------------------------- the suites
def _kind(module_type: str, shape: list[int]) -> str:
    """The layer kind of a model_shapes.json entry ('SNConv2d', 'SpectralConv1d', ...)."""
    ndim = len(shape)
    if "Embedding" in module_type and ndim == 2:
        return "embedding"
    if "ConvTranspose2d" in module_type and ndim == 4:
        return "conv_transpose2d"
    if "Conv1d" in module_type and ndim == 3:
        return "conv1d"
    if "Conv2d" in module_type and ndim == 4:
        return "conv2d"
    if "Linear" in module_type and ndim == 2:
        return "linear"
    raise ValueError(f"model_shapes.json: no layer kind for type {module_type!r} with shape {shape}")


def _model_suites() -> dict[str, Suite]:
    text = resources.files("sn_cuda").joinpath("data/model_shapes.json").read_text()
    suites = {}
    for name, model in json.loads(text)["models"].items():
        layers = tuple(
            LayerSpec(l["name"], _kind(l["type"], l["shape"]), tuple(l["shape"])) for l in model["layers"]
        )
        suites[name] = Suite(name, model["title"], model["source"], layers)
    return suites


def _synthetic_suites() -> dict[str, Suite]:
    many_small = tuple(LayerSpec(f"conv{i}", "conv2d", (64, 64, 3, 3)) for i in range(64))
    return {
        "many_small": Suite("many_small", "64 x Conv2d 64->64 3x3 (launch-bound)", "synthetic", many_small),
        "linear4096": Suite(
            "linear4096", "one Linear 4096x4096 (bandwidth-bound)", "synthetic",
            (LayerSpec("linear", "linear", (4096, 4096)),),
        ),
        # One small layer of every kind the suites use; for smoke tests of the bench itself.
        "tiny_mixed": Suite(
            "tiny_mixed", "one small layer of each kind (smoke test)", "synthetic",
            (
                LayerSpec("linear", "linear", (32, 48)),
                LayerSpec("embed", "embedding", (10, 32)),
                LayerSpec("conv1d", "conv1d", (16, 8, 3)),
                LayerSpec("conv2d", "conv2d", (16, 8, 3, 3)),
                LayerSpec("deconv", "conv_transpose2d", (8, 16, 4, 4)),
            ),
        ),
    }


_SUITES: dict[str, Suite] | None = None


def all_suites() -> dict[str, Suite]:
    """Every suite by name: the standard ones first, then the others in file order."""
    global _SUITES
    if _SUITES is None:
        found = {**_model_suites(), **_synthetic_suites()}
        order = list(STANDARD) + [n for n in found if n not in STANDARD]
        _SUITES = {n: found[n] for n in order}
    return _SUITES


def get_suite(name: str) -> Suite:
    suites = all_suites()
    if name not in suites:
        raise KeyError(f"unknown suite {name!r}; `python -m sn_cuda bench --list` lists them")
    return suites[name]
