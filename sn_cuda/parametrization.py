"""``sn_cuda.spectral_norm``: torch.nn.utils.parametrizations.spectral_norm, computed by sn_cuda.

The parametrization subclasses torch's own ``_SpectralNorm``, so everything a user or a
checkpoint can see is torch's: the ``parametrizations.weight.original`` and
``parametrizations.weight.0._u / _v`` keys, the 15-step initialisation (in float32 for
float16/bfloat16 weights) and the extra step of ``register_parametrization``'s check in
training mode, the errors, ``right_inverse`` and
removal with ``torch.nn.utils.parametrize.remove_parametrizations``. Only ``forward``
changes: it calls ``sn_cuda.ops.spectral_norm`` (the fused kernels on CUDA, the pure-torch
reference elsewhere, which performs torch's exact op sequence).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm

from . import ops, reference
from ._staged import Staged
from .reference import default_dim

__all__ = ["SpectralNorm", "spectral_norm"]


class SpectralNorm(Staged, _TorchSpectralNorm):
    """torch's spectral-norm parametrization whose forward runs on sn_cuda's ops.

    ``last_sigma`` holds σ of the last forward (``sn_cuda.sigmas(model)`` reads it, at no
    extra pass over the weight); ``_staged`` is the hand-off from ``sn_cuda.batch``
    (``sn_cuda/_staged.py``).
    """

    def _get_name(self) -> str:
        return "_SpectralNorm"  # what the module's repr prints: torch's, as printed models compare

    @torch.no_grad()
    def _power_method(self, weight_mat: Tensor, n_power_iterations: int) -> None:
        # torch's __init__ runs its 15 steps here in the weight's dtype: a float16 weight whose
        # W v overflows (or underflows, pytorch#61954) leaves u, v NaN for good. The reference
        # runs torch's own ops for float32/float64, float32 arithmetic for float16/bfloat16.
        with reference.no_autocast(weight_mat.device):
            reference.power_iteration(
                weight_mat, self._u, self._v, True, n_power_iterations, self.eps
            )

    def forward(self, weight: Tensor) -> Tensor:
        if self._staged is not None:
            return self._staged
        if weight.ndim == 1 or weight.is_complex():
            # W / ‖W‖ for 1-D weights; complex weights stay on torch's own code.
            return super().forward(weight)
        # The buffers and last_sigma through the dicts: nn.Module's __getattr__/__setattr__
        # cost ~1 and ~3 µs a call, on every read of the weight.
        buffers = self._buffers
        w_sn, sigmas = ops.spectral_norm(
            [weight], [buffers["_u"]], [buffers["_v"]], [self.dim], True,
            self.n_power_iterations, self.eps, self.training,
        )
        ops.record_sigma(self, sigmas, 0)
        return w_sn[0]


def spectral_norm(
    module: torch.nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> torch.nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` (same arguments, state_dict
    keys, initial u/v for the same RNG state, errors), computed by sn_cuda."""
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        dim = default_dim(module)
    parametrize.register_parametrization(
        module, name, SpectralNorm(weight, n_power_iterations, dim, eps)
    )
    return module
