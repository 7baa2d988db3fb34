"""``sn_cuda.patch_torch()``: make torch's own spectral_norm functions build sn_cuda layers.

For code that calls ``torch.nn.utils.spectral_norm(...)`` or
``torch.nn.utils.parametrizations.spectral_norm(...)`` and that you do not want to edit.
Code that did ``from torch.nn.utils import spectral_norm`` before the patch keeps torch's
function (it holds its own reference): patch first, then import the model code.
"""

from __future__ import annotations

import importlib

from . import legacy, parametrization

__all__ = ["patch_torch", "TorchPatch"]

# (module path, attribute) -> sn_cuda's replacement. torch.nn.utils.spectral_norm is both a
# submodule and (in torch.nn.utils) the function it defines: both places are patched.
_REPLACEMENTS = {
    ("torch.nn.utils", "spectral_norm"): legacy.spectral_norm,
    ("torch.nn.utils.spectral_norm", "spectral_norm"): legacy.spectral_norm,
    ("torch.nn.utils.parametrizations", "spectral_norm"): parametrization.spectral_norm,
}


# Torch's own functions, saved by the first patch, and the patches now in force. Handles may
# be undone in any order (not only nested): the last one undone puts torch's functions back.
_originals: dict[tuple[str, str], object] = {}
_active: list["TorchPatch"] = []


class TorchPatch:
    """Handle of ``patch_torch()``: ``.undo()`` ends this patch, and once no patch is left
    torch's exact function objects are back; also a context manager
    (``with sn_cuda.patch_torch(): ...``)."""

    def __init__(self) -> None:
        if not _active:
            for module_name, attr in _REPLACEMENTS:
                _originals[module_name, attr] = getattr(importlib.import_module(module_name), attr)
        for (module_name, attr), replacement in _REPLACEMENTS.items():
            setattr(importlib.import_module(module_name), attr, replacement)
        _active.append(self)

    @property
    def active(self) -> bool:
        return any(patch is self for patch in _active)

    def undo(self) -> None:
        if not self.active:
            return
        _active[:] = [patch for patch in _active if patch is not self]
        if not _active:
            for (module_name, attr), original in _originals.items():
                setattr(importlib.import_module(module_name), attr, original)
            _originals.clear()

    def __enter__(self) -> "TorchPatch":
        if not self.active:  # a handle used again after its undo would silently patch nothing
            raise RuntimeError(
                "this patch_torch() handle was undone: call sn_cuda.patch_torch() for a new one"
            )
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_torch() -> TorchPatch:
    """Replace torch.nn.utils.spectral_norm and torch.nn.utils.parametrizations.spectral_norm
    with sn_cuda's drop-ins; returns a handle whose ``.undo()`` restores torch's functions."""
    return TorchPatch()
