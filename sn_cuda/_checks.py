"""Argument checks shared by sn_cuda's own entry points (``apply``, ``SpectralPenalty``,
``conv_spectral_norm``): errors that name the argument before anything is changed, where the
value would otherwise fail deep inside (``range()``, ``clamp_min()``) or only at the first call.
The drop-in flavours keep torch's own checks and messages instead."""

from __future__ import annotations

import numbers

from torch import nn


def check_power_iteration_settings(caller: str, n_power_iterations, eps) -> None:
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, numbers.Integral):
        raise TypeError(
            f"{caller}: n_power_iterations must be an int, got {type(n_power_iterations).__name__}"
        )
    if n_power_iterations <= 0:  # torch's message
        raise ValueError(
            "Expected n_power_iterations to be positive, but "
            f"got n_power_iterations={n_power_iterations}"
        )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{caller}: eps must be a float, got {type(eps).__name__}")


def check_module(caller: str, module) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{caller}: expected an nn.Module, got {type(module).__name__}")
