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


class TorchPatch:
    """Handle of ``patch_torch()``: ``.undo()`` puts back exactly what it replaced; also a
    context manager (``with sn_cuda.patch_torch(): ...``)."""

    def __init__(self) -> None:
        self._saved = []
        for (module_name, attr), replacement in _REPLACEMENTS.items():
            module = importlib.import_module(module_name)
            self._saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, replacement)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def undo(self) -> None:
        # Reverse order, so that nested patches unwind to torch's originals.
        for module, attr, original in reversed(self._saved):
            setattr(module, attr, original)
        self._saved = []

    def __enter__(self) -> "TorchPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_torch() -> TorchPatch:
    """Replace torch.nn.utils.spectral_norm and torch.nn.utils.parametrizations.spectral_norm
    with sn_cuda's drop-ins; returns a handle whose ``.undo()`` restores torch's functions."""
    return TorchPatch()
