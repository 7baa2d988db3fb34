"""Finding the spectral norms in a model, and choosing modules by type or name.

What ``sn_cuda.batch``, ``sn_cuda.apply``, ``sn_cuda.sigmas`` and ``SpectralPenalty`` share:
- ``spectral_norm_layers(model)``: every spectral-normalized tensor (torch's or sn_cuda's,
  either flavour), with where its weight, u and v live;
- ``has_spectral_norm`` / ``raw_weight``: whether a module's ``weight`` is under a spectral
  norm, and the tensor before it;
- ``select_modules``: the include/exclude rule of ``apply`` and ``SpectralPenalty``;
- ``sigmas(model)``: σ of every layer's last forward;
- ``layer_name``: the names all of these (and ``python -m sn_cuda inspect``) give a layer.
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchParamSN

from .conv_norm import ConvSpectralNorm

__all__ = [
    "SpectralNormLayer", "spectral_norm_layers", "layer_name", "has_spectral_norm", "raw_weight",
    "DEFAULT_TYPES", "select_modules", "sigmas",
]

_TorchHookSN = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm
# Parametrizations that divide a weight by a spectral norm (sn_cuda's subclass torch's).
_SN_PARAMETRIZATIONS = (_TorchParamSN, ConvSpectralNorm)


class SpectralNormLayer:
    """One spectral-normalized tensor: where its weight, u, v live and which object computes it."""

    __slots__ = ("name", "module", "sn", "param_flavour", "plist", "tensor_name", "torch_class",
                 "plist_class", "params", "wkey", "buffers", "ukey", "vkey", "mode",
                 "registry", "registry_key", "registered")

    def __init__(self, name, module, sn, param_flavour, plist=None, tensor_name=None, hook_id=None):
        self.name = name  # qualified name, "" for the root
        self.module = module  # the module that owns the weight
        self.sn = sn  # parametrization module or legacy hook
        self.param_flavour = param_flavour
        self.plist = plist  # ParametrizationList (parametrization flavour)
        self.tensor_name = tensor_name  # its key in module.parametrizations
        self.torch_class = None  # class to restore on remove(), when torch's
        self.plist_class = None  # the ParametrizationList's class, to restore on remove()
        # Where the hot path finds weight, u and v: the modules' own dicts (they stay the
        # same objects through .to(), load_state_dict and optimizer steps), and the keys.
        # And where it can tell that the spectral norm is still the module's: removal takes
        # ``registry[registry_key]`` away, and applying it again puts another object there.
        if param_flavour:
            self.params, self.wkey = plist._parameters, "original"
            self.buffers, self.ukey, self.vkey = sn._buffers, "_u", "_v"
            self.mode = sn  # train()/eval() reach the parametrization module
            self.registry, self.registry_key = module.parametrizations._modules, tensor_name
            self.registered = plist
        else:
            self.params, self.wkey = module._parameters, sn.name + "_orig"
            self.buffers, self.ukey, self.vkey = module._buffers, sn.name + "_u", sn.name + "_v"
            self.mode = module  # the hook iterates when its module is training
            self.registry, self.registry_key = module._forward_pre_hooks, hook_id
            self.registered = sn


def _parametrizations(module: nn.Module, kinds) -> Iterator[tuple[str, object, nn.Module]]:
    """(tensor name, its ParametrizationList, p) for each parametrization ``p`` of ``module``
    of a type in ``kinds``."""
    if parametrize.is_parametrized(module):
        for tensor_name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, kinds):
                    yield tensor_name, plist, p


def spectral_norm_layers(model: nn.Module) -> Iterator[SpectralNormLayer]:
    """Every spectral-normalized tensor under ``model`` (torch's or sn_cuda's, both flavours),
    in module order."""
    for name, module in model.named_modules():
        for tensor_name, plist, p in _parametrizations(module, _TorchParamSN):
            yield SpectralNormLayer(layer_name(name, tensor_name), module, p, True, plist, tensor_name)
        for hook_id, hook in module._forward_pre_hooks.items():
            if isinstance(hook, _TorchHookSN):
                yield SpectralNormLayer(layer_name(name, hook.name), module, hook, False, hook_id=hook_id)


def layer_name(module_name: str, tensor_name: str) -> str:
    """"conv1" for conv1.weight (the usual case), "conv1.other" for another tensor."""
    if tensor_name == "weight":
        return module_name
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def _weight_source(module: nn.Module) -> str:
    """Where ``module``'s raw weight is: ``"original"`` when ``module.weight`` is parametrized
    by a spectral norm (torch's, sn_cuda's, or ``conv_spectral_norm``), ``"weight_orig"``
    under a legacy spectral-norm hook, ``"weight"`` otherwise (under no spectral norm,
    possibly under another parametrization). Direct dict reads: ``SpectralPenalty`` asks for
    every layer on every call."""
    plists = module._modules.get("parametrizations")
    plist = None if plists is None else plists._modules.get("weight")
    if plist is not None:
        return "original" if any(isinstance(p, _SN_PARAMETRIZATIONS) for p in plist) else "weight"
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _TorchHookSN) and hook.name == "weight":
            return "weight_orig"
    return "weight"


def has_spectral_norm(module: nn.Module) -> bool:
    """Whether ``module.weight`` is divided by a spectral norm (either flavour, torch's or
    sn_cuda's, or ``conv_spectral_norm``)."""
    return _weight_source(module) != "weight"


def raw_weight(module: nn.Module) -> torch.Tensor | None:
    """The tensor under ``module.weight``'s spectral norm, or ``module.weight`` itself (None
    when there is none)."""
    source = _weight_source(module)
    if source == "original":
        return module.parametrizations.weight.original
    return getattr(module, source, None)


# Module types whose weight sn_cuda.apply normalizes and SpectralPenalty penalizes by default.
DEFAULT_TYPES = (
    nn.Linear, nn.Embedding,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def _module_filter(spec, argname: str, caller: str):
    """None, a module type, an fnmatch pattern on the qualified module name, or an iterable
    of those -> a predicate (or None). ``caller`` and ``argname`` name the argument in the
    error for anything else."""
    if spec is None:
        return None
    try:
        items = [spec] if isinstance(spec, (str, type)) else list(spec)
    except TypeError:  # not iterable: a module instance, a number
        items = [spec]
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(
                f"{caller}: {argname} must hold module types or name patterns (str), "
                f"got {type(item).__name__}"
            )
    types = tuple(i for i in items if isinstance(i, type))
    patterns = [i for i in items if isinstance(i, str)]

    def matches(name: str, module: nn.Module) -> bool:
        return isinstance(module, types) or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return matches


def select_modules(model: nn.Module, include, exclude, caller: str) -> list[tuple[str, nn.Module]]:
    """(name, module) under ``model`` that ``include`` (default: ``DEFAULT_TYPES``) picks and
    ``exclude`` does not: each a module type, an fnmatch pattern on the qualified name, or an
    iterable of those. All arguments are checked before anything is returned; a picked module
    whose raw weight is not materialized yet (a lazy module) is an error naming it."""
    included = _module_filter(DEFAULT_TYPES if include is None else include, "include", caller)
    excluded = _module_filter(exclude, "exclude", caller)
    chosen = []
    for name, module in model.named_modules():
        if not included(name, module) or (excluded is not None and excluded(name, module)):
            continue
        if isinstance(raw_weight(module), nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{caller}: module '{name}' has an uninitialized weight (a lazy module); run a "
                "forward pass first"
            )
        chosen.append((name, module))
    return chosen


def sigmas(model: nn.Module) -> dict[str, float]:
    """{qualified layer name: σ used by its last forward}, for every spectral-normalized layer
    under ``model`` computed by sn_cuda (per layer or batched; conv_spectral_norm's σ of the
    convolution too). Costs no pass over a weight: the values come from the last forward
    (layers not run yet are left out)."""
    out, cache = {}, {}
    for name, sn in _sigma_sources(model):
        last = getattr(sn, "last_sigma", None)
        if last is None:
            continue
        tensor, i = last
        values = cache.get(id(tensor))
        if values is None:  # one device-to-host copy per fused call, not per layer
            values = cache[id(tensor)] = tensor.double().tolist()
        out[name] = values[i]
    return out


def _sigma_sources(model: nn.Module) -> Iterator[tuple[str, object]]:
    """(layer name, object keeping its last σ): the spectral norms, and conv_spectral_norm's."""
    for layer in spectral_norm_layers(model):
        yield layer.name, layer.sn
    for name, module in model.named_modules():
        for tensor_name, _, p in _parametrizations(module, ConvSpectralNorm):
            yield layer_name(name, tensor_name), p
