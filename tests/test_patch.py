"""sn_cuda.patch_torch(): torch's two spectral_norm functions build sn_cuda layers, and undo
puts back torch's exact function objects (also as a context manager, also nested)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sn_cuda
import sn_cuda.legacy
import sn_cuda.parametrization

# Every place patch_torch replaces, read fresh each time (never a name bound at import).
_PLACES = [
    ("torch.nn.utils", "spectral_norm"),
    ("torch.nn.utils.spectral_norm", "spectral_norm"),
    ("torch.nn.utils.parametrizations", "spectral_norm"),
]


def _current():
    return [getattr(importlib.import_module(module), attr) for module, attr in _PLACES]


@pytest.fixture
def originals():
    before = _current()
    yield before
    # Whatever a test did, torch must be left as it was for the tests that follow.
    assert _current() == before


def _builds_sn_cuda_layers():
    legacy = torch.nn.utils.spectral_norm(nn.Linear(3, 4))
    submodule = importlib.import_module("torch.nn.utils.spectral_norm")
    legacy_too = submodule.spectral_norm(nn.Linear(3, 4))
    param = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4))
    hooks = [h for m in (legacy, legacy_too) for h in m._forward_pre_hooks.values()]
    return (
        len(hooks) == 2
        and all(type(h) is sn_cuda.legacy.SpectralNorm for h in hooks)
        and type(param.parametrizations.weight[0]) is sn_cuda.parametrization.SpectralNorm
    )


def test_patch_and_undo_restore_torchs_objects(originals):
    assert not _builds_sn_cuda_layers()
    handle = sn_cuda.patch_torch()
    assert handle.active
    assert _current() == [sn_cuda.legacy.spectral_norm, sn_cuda.legacy.spectral_norm, sn_cuda.spectral_norm]
    assert _builds_sn_cuda_layers()
    handle.undo()
    assert not handle.active
    assert all(now is before for now, before in zip(_current(), originals))
    assert not _builds_sn_cuda_layers()
    handle.undo()  # a second undo changes nothing
    assert all(now is before for now, before in zip(_current(), originals))


def test_context_manager_restores_even_on_error(originals):
    with pytest.raises(KeyError):
        with sn_cuda.patch_torch() as handle:
            assert handle.active and _builds_sn_cuda_layers()
            raise KeyError("boom")
    assert all(now is before for now, before in zip(_current(), originals))


def test_nested_patches_unwind_to_torch(originals):
    with sn_cuda.patch_torch():
        with sn_cuda.patch_torch():
            assert _builds_sn_cuda_layers()
        # The inner exit puts back what it found: the outer patch, still active.
        assert _builds_sn_cuda_layers()
    assert all(now is before for now, before in zip(_current(), originals))
    for order in ("nested", "crossed"):
        outer = sn_cuda.patch_torch()
        inner = sn_cuda.patch_torch()
        first, second = (inner, outer) if order == "nested" else (outer, inner)
        first.undo()
        assert second.active and _builds_sn_cuda_layers()
        second.undo()
        assert all(now is before for now, before in zip(_current(), originals)), order


def test_patched_functions_compute_torchs_numbers(originals, flavour, layers, make_twins):
    # A layer built through the patched torch function equals one built by torch's own.
    layer = layers["conv2d_groups"]
    twins = make_twins(flavour, layer)
    torch.manual_seed(0)
    module = layer.make()
    torch.manual_seed(1)
    with sn_cuda.patch_torch():
        patched_fn = getattr(importlib.import_module(flavour.torch_fn.__module__), "spectral_norm")
        assert patched_fn is flavour.sn_fn
        patched_fn(module)
    twins.sn = module
    twins.assert_state_same("after registration")
    twins.step([twins.input(), twins.input()], training=True)
    twins.step([twins.input()], training=False)
    flavour.remove(module)
    if not flavour.is_legacy:
        assert not parametrize.is_parametrized(module)


def test_an_undone_handle_cannot_be_entered_again(originals):
    handle = sn_cuda.patch_torch()
    with handle:
        assert _builds_sn_cuda_layers()
    with pytest.raises(RuntimeError, match="was undone"):
        with handle:
            pass
    assert all(now is before for now, before in zip(_current(), originals))
