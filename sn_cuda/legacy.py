"""``sn_cuda.legacy``: torch.nn.utils.spectral_norm / remove_spectral_norm, computed by sn_cuda.

The forward pre-hook subclasses torch's own ``SpectralNorm``, so state_dict keys
(``weight_orig``, ``weight_u``, ``weight_v``), the ``spectral_norm`` version metadata, the
loading of old version-less checkpoints (torch's ``SpectralNormLoadStateDictPreHook``), removal
and the errors are torch's. Only ``compute_weight`` changes: it calls
``sn_cuda.ops.spectral_norm`` with the hook flavour's order (v first, then u).
"""

from __future__ import annotations

import copy
import importlib
import weakref

import torch
from torch import Tensor
from torch.nn.utils.spectral_norm import remove_spectral_norm

from . import ops
from ._staged import Staged
from .reference import default_dim

_module_setattr = torch.nn.Module.__setattr__

# The submodule, not the function of the same name that torch.nn.utils exports.
_torch_sn = importlib.import_module("torch.nn.utils.spectral_norm")

__all__ = ["SpectralNorm", "spectral_norm", "remove_spectral_norm"]


class SpectralNorm(Staged, _torch_sn.SpectralNorm):
    """torch's legacy spectral-norm hook whose weight computation runs on sn_cuda's ops.

    ``remove_spectral_norm`` is torch's own: it finds this hook as a ``SpectralNorm``.
    """

    # A weak reference to the W/σ this hook last set as ``module.<name>``, for __deepcopy__.
    _set_weight: weakref.ref | None = None

    def __call__(self, module: torch.nn.Module, inputs) -> None:
        staged = self._staged
        if staged is None:
            staged = self.compute_weight(module, do_power_iteration=module.training)
        if type(module).__setattr__ is _module_setattr and self.name not in module._parameters:
            # What nn.Module.__setattr__ does with a tensor that is no parameter or buffer,
            # without its checks: ~2 µs a layer a forward (a module that overrides
            # __setattr__ still gets its own; a parameter registered under the name since,
            # torch's TypeError).
            module.__dict__[self.name] = staged
        else:
            setattr(module, self.name, staged)
        self._set_weight = weakref.ref(staged)

    def __deepcopy__(self, memo):
        # After a forward with grad enabled, ``module.weight`` is W/σ, a non-leaf, and
        # copy.deepcopy(module) fails on it with torch's hook (Tensor.__deepcopy__ takes leaves
        # only). A module's __dict__ is copied in order and its hooks come before that
        # attribute (set after the hook was registered), so the memo is seeded here: the
        # copy's ``weight`` is a detached clone, what a forward under no_grad leaves. The
        # original module is not touched.
        weight = self._set_weight() if self._set_weight is not None else None
        if weight is not None and not weight.is_leaf and id(weight) not in memo:
            memo[id(weight)] = weight.detach().clone()
            memo.setdefault(id(memo), []).append(weight)  # alive (its id unique) meanwhile
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__getstate__().items():
            setattr(copied, key, copy.deepcopy(value, memo))
        return copied

    def __getstate__(self):
        # Not carried over: the weak reference to the original's tensor (not picklable, and
        # meaningless in a copy), and W/σ staged by a batched forward in progress.
        state = super().__getstate__()
        state.pop("_set_weight", None)
        return state

    def compute_weight(self, module: torch.nn.Module, do_power_iteration: bool) -> Tensor:
        weight = getattr(module, self.name + "_orig")
        if weight.is_complex():
            # torch's own: its σ = dot(u, W v), unconjugated, differs from the parametrization
            # flavour's vdot that sn_cuda's ops compute.
            return super().compute_weight(module, do_power_iteration)
        u = getattr(module, self.name + "_u")
        v = getattr(module, self.name + "_v")
        w_sn, sigmas = ops.spectral_norm(
            [weight], [u], [v], [self.dim], False, self.n_power_iterations, self.eps,
            do_power_iteration,
        )
        ops.record_sigma(self, sigmas, 0)
        return w_sn[0]

    @staticmethod
    def apply(module: torch.nn.Module, name: str, n_power_iterations: int, dim: int, eps: float) -> "SpectralNorm":
        # torch's own registration (its checks, RNG draws, buffers and state_dict hooks), then
        # this class for the hook object it registered: nothing of torch's is copied here.
        fn = _torch_sn.SpectralNorm.apply(module, name, n_power_iterations, dim, eps)
        fn.__class__ = SpectralNorm
        return fn


def spectral_norm(
    module: torch.nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> torch.nn.Module:
    """Drop-in for ``torch.nn.utils.spectral_norm`` (same arguments, keys, initial u/v for the
    same RNG state, errors), computed by sn_cuda. Remove it with ``remove_spectral_norm``."""
    if dim is None:
        dim = default_dim(module)
    SpectralNorm.apply(module, name, n_power_iterations, dim, eps)
    return module
