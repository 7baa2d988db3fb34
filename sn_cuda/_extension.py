"""Loading the compiled kernels (``sn_cuda._C``) and saying which backend runs, and why.

The extension only registers CUDA implementations of the ops that ``sn_cuda.ops`` defines;
when it is missing, fails to load, or was built against another torch, everything runs on
the pure-torch reference path and ``sn_cuda.backend()`` says why (one warning, at import).
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

# Set SN_CUDA_DISABLE=1 to ignore a built extension (the reference path everywhere).
_DISABLE_ENV = "SN_CUDA_DISABLE"


class Backend(str):
    """``"cuda"`` or ``"torch"``; ``.reason`` says why this one was chosen."""

    reason: str

    def __new__(cls, name: str, reason: str) -> "Backend":
        self = super().__new__(cls, name)
        self.reason = reason
        return self

    def __repr__(self) -> str:
        return f"Backend({str(self)!r}, reason={self.reason!r})"


def _load() -> tuple[bool, str]:
    """Import the compiled module; return (loaded, why) without raising."""
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return False, f"{_DISABLE_ENV} is set: the compiled extension is ignored"
    try:
        importlib.import_module("sn_cuda._C")
    except ImportError as e:
        if "No module named" in str(e) and "sn_cuda._C" in str(e):
            return False, "the compiled extension is not installed (pure-Python install)"
        return False, f"the compiled extension failed to load ({e}); built for another torch?"
    except OSError as e:  # missing shared libraries
        return False, f"the compiled extension failed to load ({e})"
    return True, "compiled extension loaded"


LOADED, LOAD_REASON = _load()
if not LOADED and "not installed" not in LOAD_REASON and _DISABLE_ENV not in LOAD_REASON:
    warnings.warn(f"sn_cuda: using the pure-torch path: {LOAD_REASON}", RuntimeWarning, stacklevel=2)


def backend() -> Backend:
    """Which implementation computes spectral norm of CUDA tensors here, and why.

    ``"cuda"`` when the compiled kernels are loaded and a GPU is visible; ``"torch"``
    otherwise (CPU tensors always take the pure-torch path).
    """
    if not LOADED:
        return Backend("torch", LOAD_REASON)
    if not torch.cuda.is_available():
        return Backend("torch", "compiled extension loaded, but no CUDA device is available")
    return Backend("cuda", f"compiled kernels on {torch.cuda.get_device_name()}")
