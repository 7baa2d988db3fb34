"""The compiled extension sn_cuda._C: it loads, and importing it registers a CUDA kernel for
each of the three ops, normalize's autograd and power_iteration's in-place bookkeeping (no
GPU needed: registration happens when the library loads).

Skipped where the extension is not built, unless SN_CUDA_REQUIRE_EXTENSION=1 (CI sets it,
after a forced build): then a missing or broken extension fails.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sn_cuda import _extension

OPS = ["power_iteration", "normalize", "normalize_backward"]
# (op, dispatch key as _dispatch_dump names it, the csrc file that registers it)
REGISTRATIONS = [(op, "CUDA", f"{op}.cu") for op in OPS] + [
    ("normalize", "Autograd[alias]", "autograd.cpp"),
    ("power_iteration", "ADInplaceOrView", "autograd.cpp"),
]
REQUIRED = _extension.env_flag("SN_CUDA_REQUIRE_EXTENSION")
BUILT = importlib.util.find_spec("sn_cuda._C") is not None
DISABLED = _extension.env_flag("SN_CUDA_DISABLE")


def _need_loaded_extension():
    if _extension.LOADED:
        return
    if REQUIRED:
        pytest.fail(f"SN_CUDA_REQUIRE_EXTENSION is set but {_extension.LOAD_REASON}")
    pytest.skip(f"the compiled extension is not loaded: {_extension.LOAD_REASON}")


def test_extension_loads_when_required_or_built():
    if not (REQUIRED or (BUILT and not DISABLED)):
        pytest.skip("the compiled extension is not built, or SN_CUDA_DISABLE is set")
    assert _extension.LOADED, _extension.LOAD_REASON
    assert "loaded" in _extension.LOAD_REASON


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    _need_loaded_extension()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sn_cuda::{op}", "CUDA"), op


@pytest.mark.parametrize("op, key, source", REGISTRATIONS, ids=[f"{o}-{k}" for o, k, _ in REGISTRATIONS])
def test_the_kernel_comes_from_csrc(op, key, source):
    # One kernel for the key, the extension's (not a Python one registered over it).
    _need_loaded_extension()
    dump = torch._C._dispatch_dump(f"sn_cuda::{op}")
    lines = [line for line in dump.splitlines() if line.startswith(f"{key}:")]
    assert len(lines) == 1, dump
    assert source in lines[0], lines[0]


def test_backend_reports_the_extension():
    _need_loaded_extension()
    backend = _extension.backend()
    if torch.cuda.is_available():
        assert backend == "cuda", backend.reason
    else:
        assert backend == "torch" and "no CUDA device" in backend.reason


def test_environment_flag_values(monkeypatch):
    for value in ("1", "true", "Yes", " on "):
        monkeypatch.setenv("SN_CUDA_DISABLE", value)
        assert _extension.env_flag("SN_CUDA_DISABLE"), value
    for value in ("", "0", "false", "No", "off"):
        monkeypatch.setenv("SN_CUDA_DISABLE", value)
        assert not _extension.env_flag("SN_CUDA_DISABLE"), value
    monkeypatch.delenv("SN_CUDA_DISABLE")
    assert not _extension.env_flag("SN_CUDA_DISABLE")
    monkeypatch.setenv("SN_CUDA_DISABLE", "maybe")
    with pytest.warns(RuntimeWarning, match="SN_CUDA_DISABLE='maybe' is not understood"):
        assert not _extension.env_flag("SN_CUDA_DISABLE")


def test_the_build_is_stamped_with_the_schemas():
    # setup.py writes the fingerprint of the op schemas next to the module it builds.
    if not BUILT:
        pytest.skip("the compiled extension is not built")
    from sn_cuda import schemas

    origin = importlib.util.find_spec("sn_cuda._C").origin
    assert open(origin + schemas.STAMP_SUFFIX).read().strip() == schemas.fingerprint()


def test_a_build_for_another_python_is_named(tmp_path):
    (tmp_path / "_C.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "_C.schemas").write_text("0\n")
    assert _extension.other_builds(tmp_path) == ["_C.cpython-399-x86_64-linux-gnu.so"]
    assert _extension.other_builds(tmp_path / "nothing") == []
    # One this interpreter would import is not "another" (it is missing for other reasons).
    import importlib.machinery

    (tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    assert _extension.other_builds(tmp_path) == ["_C.cpython-399-x86_64-linux-gnu.so"]
