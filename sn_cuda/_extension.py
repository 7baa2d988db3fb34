"""Loading the compiled kernels (``sn_cuda._C``) and saying which backend runs, and why.

The extension only registers CUDA implementations of the ops that ``sn_cuda.ops`` defines;
when it is missing, fails to load, or was built against another torch, everything runs on
the pure-torch reference path and ``sn_cuda.backend()`` says why (one warning, at import).
A build that is merely absent warns only where it costs something: with a CUDA build of torch
(a CPU-only torch has no CUDA tensors to lose speed on); ``SN_CUDA_DISABLE=1`` never warns.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from . import schemas

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


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` (``SN_CUDA_DISABLE``, the tests'
    ``SN_CUDA_REQUIRE_EXTENSION``) is on: 1/true/yes/on are, 0/false/no/off and nothing are
    not; anything else is not either, with a warning (a plain "is it set" test once turned the
    kernels off for ``SN_CUDA_DISABLE=false``)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        warnings.warn(
            f"sn_cuda: {name}={value!r} is not understood (1 or 0): ignored",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _stale(spec) -> str | None:
    """Why the found module must not be loaded (built from other op schemas), or None."""
    if spec.origin is None:
        return None
    stamp = Path(spec.origin + schemas.STAMP_SUFFIX)
    built_for = stamp.read_text().strip() if stamp.is_file() else None
    if built_for == schemas.fingerprint():
        return None
    return (
        f"the compiled extension {Path(spec.origin).name} was built from another version of "
        f"sn_cuda (its op schemas differ{'' if built_for else ', or it has no ' + stamp.name}); "
        "reinstall sn_cuda to rebuild it"
    )


def other_builds(package_dir: Path) -> list[str]:
    """The compiled modules in ``package_dir`` that this interpreter cannot import: ``_C``
    built for another Python or platform (``_C.cpython-312-x86_64-linux-gnu.so``)."""
    ours = tuple("_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(
        p.name for p in package_dir.glob("_C.*")
        if p.suffix in (".so", ".pyd") and not p.name.endswith(ours)
    )


def _load() -> tuple[str, str]:
    """Import the compiled module without raising; return (what happened, why): "loaded",
    "disabled" (SN_CUDA_DISABLE), "absent" (a pure-Python install) or "unusable"."""
    if env_flag(_DISABLE_ENV):
        return "disabled", f"{_DISABLE_ENV} is set: the compiled extension is ignored"
    try:
        spec = importlib.util.find_spec("sn_cuda._C")
        if spec is None:
            raise ModuleNotFoundError("No module named 'sn_cuda._C'", name="sn_cuda._C")
        stale = _stale(spec)
        if stale:
            return "unusable", stale
        importlib.import_module("sn_cuda._C")
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "sn_cuda._C":
            others = other_builds(Path(__file__).parent)
            if others:
                return "unusable", (
                    f"the compiled extension was built for another Python or platform "
                    f"({', '.join(others)}; this is {sys.implementation.cache_tag}): "
                    "reinstall sn_cuda to rebuild it"
                )
            return "absent", "the compiled extension is not installed (pure-Python install)"
        if any(s in str(e) for s in _ABI_MISMATCH):
            return "unusable", (
                f"the compiled extension was built for another torch (this is torch "
                f"{torch.__version__}): {e}; reinstall sn_cuda to rebuild it"
            )
        return "unusable", f"the compiled extension failed to load ({e}); built for another torch?"
    except Exception as e:  # OSError: a missing shared library; errors while registering ops
        return "unusable", f"the compiled extension failed to load ({type(e).__name__}: {e})"
    return "loaded", "compiled extension loaded"


# How the loader reports a C++ symbol that this torch does not export (Linux, macOS, Windows).
_ABI_MISMATCH = ("undefined symbol", "Symbol not found", "specified procedure could not be found")

_STATE, LOAD_REASON = _load()
LOADED = _STATE == "loaded"
# A pure-Python install on a CPU-only torch loses nothing: no warning then.
if _STATE == "unusable" or (
    _STATE == "absent" and (torch.version.cuda is not None or torch.version.hip is not None)
):
    warnings.warn(
        f"sn_cuda: CUDA tensors take the pure-torch path: {LOAD_REASON} "
        f"(set {_DISABLE_ENV}=1 to silence this)",
        RuntimeWarning,
        stacklevel=2,
    )


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
