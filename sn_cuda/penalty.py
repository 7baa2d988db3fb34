"""``sn_cuda.SpectralPenalty``: Σ σ(W)² over a model's layers, as a differentiable loss term.

A soft alternative (or complement) to spectral normalization: instead of dividing each weight
by σ, add ``λ · penalty()`` to the loss (Yoshida & Miyato 2017, "spectral norm
regularization"). σ of each weight is estimated by power iteration with persistent u, v
vectors, exactly as spectral normalization does (parametrization flavour: u first), and
∂σ²/∂W = 2σ u vᵀ. All selected layers that share a device and dtype go through one call of
``sn_cuda.ops.spectral_norm``: one fused batched call when the CUDA kernels can run them,
the pure-torch reference otherwise.

Which weights: by default the ``weight`` of every Conv1d/2d/3d, ConvTranspose1d/2d/3d,
Linear and Embedding module under the model (ConvTranspose weights as the (in, out·k…)
matrix, dim 1, as torch's spectral norm does); ``include`` and ``exclude`` have
``sn_cuda.apply``'s meaning. Weights of fewer than 2 dims are skipped. A layer that is
already spectral-normalized (either torch flavour, sn_cuda's, or ``conv_spectral_norm``)
contributes σ of its raw weight (``parametrizations.weight.original`` or ``weight_orig``):
σ of the normalized weight is ≈ 1 by construction, so penalizing it would do nothing. A
weight under any other parametrization contributes σ of the parametrized value.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Union

import torch
from torch import Tensor, nn

from . import ops, reference
from ._checks import check_module, check_power_iteration_settings
from .layers import raw_weight, select_modules
from .reference import default_dim

__all__ = ["SpectralPenalty"]

Selector = Union[str, type, Iterable[Union[str, type]], None]


class _PenalizedWeight(NamedTuple):
    name: str  # qualified name in the model
    module: nn.Module
    dim: int  # the matrix view's row dim (1 for ConvTranspose)
    holder: nn.Module  # the submodule of SpectralPenalty.vectors holding weight_u, weight_v

    def weight(self) -> Tensor | None:
        """The tensor penalized: the raw weight under a spectral norm, else ``module.weight``.
        Looked up at every call: moving or reloading the model may replace the tensors, and a
        spectral norm added to a layer after the penalty was made is seen."""
        return raw_weight(self.module)


class SpectralPenalty(nn.Module):
    """``penalty()`` = Σ_l σ(W_l)² over the selected weights of ``model``, differentiable.

    Args:
        model: the module whose layers are penalized. It is held by reference, outside this
            module's tree (``penalty.model``), so ``penalty.state_dict()`` holds only the u, v
            vectors and ``penalty.to()`` / ``.train()`` / ``.eval()`` do not touch the model.
        n_power_iterations: power-iteration steps per call in training mode.
        eps: the normalization epsilon of power iteration.
        include: a module type, an ``fnmatch`` pattern on the qualified module name (as in
            ``model.named_modules()``, e.g. ``"disc.blocks.*"``; ``""`` is the model itself),
            or a list of them: the modules whose ``weight`` is penalized, in place of the
            default Conv*/ConvTranspose*/Linear/Embedding types (as in ``sn_cuda.apply``).
        exclude: the same; matching modules are left out.

    In training mode (``penalty.train()``, the default) each call runs
    ``n_power_iterations`` steps, updating u and v in place; in eval mode σ comes from the
    stored vectors. The u, v of layer ``a.b`` are the buffers ``vectors.a.b.weight_u`` and
    ``vectors.a.b.weight_v`` (initialized like torch's spectral norm: normal, normalized,
    15 power iterations; so deterministic given the RNG state). They follow their weight's
    device and dtype: moving the model moves them on the next call.
    """

    def __init__(
        self,
        model: nn.Module,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        include: Selector = None,
        exclude: Selector = None,
    ) -> None:
        super().__init__()
        check_module("SpectralPenalty(model)", model)
        check_power_iteration_settings("SpectralPenalty", n_power_iterations, eps)
        chosen = select_modules(model, include, exclude, "SpectralPenalty")
        # Kept out of nn.Module.__setattr__: as a child, the model's parameters would join
        # the penalty's state_dict, parameters() and .to().
        self.__dict__["_model"] = model
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.vectors = nn.Module()
        self._layers: list[_PenalizedWeight] = []
        selected: set[int] = set()
        for name, module in chosen:
            weight = raw_weight(module)
            if not isinstance(weight, Tensor) or weight.ndim < 2:
                continue  # e.g. a norm layer matched by a name pattern
            if not weight.is_floating_point():
                raise TypeError(
                    f"SpectralPenalty: layer '{name}' has a {weight.dtype} weight; the penalty takes "
                    "real floating-point weights (exclude the layer)"
                )
            # One weight under two modules (tied embeddings) is one parameter to torch: one σ².
            if id(weight) in selected:
                continue
            selected.add(id(weight))
            dim = default_dim(module)
            u, v = self._initial_vectors(weight.detach(), dim)
            holder = self._holder(name)
            holder.register_buffer("weight_u", u)
            holder.register_buffer("weight_v", v)
            self._layers.append(_PenalizedWeight(name, module, dim, holder))
        if not self._layers:
            raise ValueError(
                "SpectralPenalty: no weight of 2 or more dims selected in "
                f"{type(model).__name__} (include={include!r}, exclude={exclude!r})"
            )
        self._last_sigmas: dict[str, Tensor] = {}

    @property
    def model(self) -> nn.Module:
        """The penalized model (a plain reference, not a submodule)."""
        return self.__dict__["_model"]

    def _holder(self, name: str) -> nn.Module:
        """The submodule of ``self.vectors`` at path ``name``, created on the way."""
        holder = self.vectors
        for part in name.split(".") if name else []:
            if part not in holder._modules:
                holder.add_module(part, nn.Module())
            holder = holder._modules[part]
        return holder

    @torch.no_grad()
    def _initial_vectors(self, weight: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        mat = reference.weight_matrix(weight, dim)
        rows, cols = mat.shape
        u = nn.functional.normalize(mat.new_empty(rows).normal_(0, 1), dim=0, eps=self.eps)
        v = nn.functional.normalize(mat.new_empty(cols).normal_(0, 1), dim=0, eps=self.eps)
        reference.power_iteration(mat, u, v, True, 15, self.eps)
        return u, v

    def _vectors_for(self, holder: nn.Module, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's u, v on its weight's device and dtype (moved once if the model moved)."""
        for key in ("weight_u", "weight_v"):
            buf = holder._buffers[key]
            if buf.device != weight.device or buf.dtype != weight.dtype:
                holder._buffers[key] = buf.to(device=weight.device, dtype=weight.dtype)
        return holder._buffers["weight_u"], holder._buffers["weight_v"]

    def forward(self) -> Tensor:
        """Σ σ_l² over the selected layers (a 0-dim tensor on the first layer's device)."""
        weights = [layer.weight() for layer in self._layers]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, w in enumerate(weights):
            groups.setdefault((w.device, w.dtype), []).append(i)
        per_layer: list[Tensor] = [None] * len(weights)  # type: ignore[list-item]
        for indices in groups.values():
            layers = [self._layers[i] for i in indices]
            ws = [weights[i] for i in indices]
            uvs = [self._vectors_for(layer.holder, w) for layer, w in zip(layers, ws)]
            # W/σ comes back too and is not needed: a σ-only op would save that pass over W.
            _, group_sigmas = ops.spectral_norm(
                ws, [u for u, _ in uvs], [v for _, v in uvs], [layer.dim for layer in layers],
                True, self.n_power_iterations, self.eps, self.training,
            )
            for i, sigma in zip(indices, group_sigmas):
                per_layer[i] = sigma
        self._last_sigmas = {layer.name: s.detach() for layer, s in zip(self._layers, per_layer)}
        device = per_layer[0].device
        return sum((s.to(device) ** 2 for s in per_layer[1:]), per_layer[0] ** 2)

    @torch.no_grad()
    def sigmas(self) -> dict[str, float]:
        """{layer name: σ estimate}: those of the last call, or (before any call) σ = u·W v
        from the stored vectors, without updating them."""
        if not self._last_sigmas:
            for layer in self._layers:
                w = layer.weight()
                u, v = self._vectors_for(layer.holder, w)
                mat = reference.weight_matrix(w, layer.dim)
                self._last_sigmas[layer.name] = torch.vdot(u, torch.mv(mat, v))
        return {name: float(s) for name, s in self._last_sigmas.items()}

    def extra_repr(self) -> str:
        return (
            f"layers={len(self._layers)}, n_power_iterations={self.n_power_iterations}, "
            f"eps={self.eps}"
        )
