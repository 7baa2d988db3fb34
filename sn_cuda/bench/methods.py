"""The ways of spectral-normalizing a model that the bench compares.

Every method is applied to the same kind of model (a ``SuiteModel`` or the SNGAN
discriminator) and is then run the same way: call the (possibly compiled) model in training
mode. Method names are the JSON keys; labels are what the table shows.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import sn_cuda

__all__ = ["METHODS", "LABELS", "unavailable_reason", "apply"]

METHODS = ("torch_hook", "torch_param", "torch_compile", "sn_cuda_layer", "sn_cuda_batched")
LABELS = {
    "none": "no SN",
    "torch_hook": "torch hook",
    "torch_param": "torch parametrization",
    "torch_compile": "torch.compile(parametrization)",
    "sn_cuda_layer": "sn_cuda per layer",
    "sn_cuda_batched": "sn_cuda batched",
}


def unavailable_reason(method: str, device: torch.device) -> str | None:
    """Why ``method`` cannot run here, or None when it can."""
    if method == "torch_compile" and device.type != "cuda":
        return "torch.compile is benchmarked on CUDA only"
    return None


def apply(method: str, model: nn.Module, layers: list[nn.Module]) -> Callable:
    """Spectral-normalize ``layers`` (modules under ``model``) the way ``method`` says; return
    what to call instead of ``model`` (``model`` itself, or its compiled version)."""
    if method == "none":
        return model
    if method == "torch_hook":
        for layer in layers:
            torch.nn.utils.spectral_norm(layer)
        return model
    if method in ("torch_param", "torch_compile"):
        for layer in layers:
            torch.nn.utils.parametrizations.spectral_norm(layer)
        if method == "torch_param":
            return model
        # A fresh dynamo cache per model: otherwise, after a few suites, recompilations of
        # the same forward hit the cache limit and silently fall back to eager.
        torch._dynamo.reset()
        return torch.compile(model)
    if method in ("sn_cuda_layer", "sn_cuda_batched"):
        for layer in layers:
            sn_cuda.spectral_norm(layer)
        if method == "sn_cuda_batched":
            model._sn_cuda_batch_handle = sn_cuda.batch(model)  # kept alive with the model
        return model
    raise ValueError(f"unknown method {method!r}; expected one of {('none',) + METHODS}")
