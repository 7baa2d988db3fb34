"""The compiled extension missing, failing to load, or built for another torch.

The cases run in a fresh interpreter in which a meta-path finder makes ``import sn_cuda._C``
raise what the import system raises in that situation (the first case is sn_cuda's import
itself; each later one reloads ``sn_cuda._extension``, whose module-level code is the whole
loading logic, to keep to one torch import). sn_cuda must then import, warn once
(RuntimeWarning), say why through ``sn_cuda.backend()``, and compute on the reference path —
the same numbers as torch's own spectral norm, on the CPU and, where there is one, on the GPU.

A module built from other op schemas than this sn_cuda's (an in-place build left behind by a
``git pull``) is not loaded at all: its stamp (``_C.schemas``) says so.

A merely absent extension warns only where something is lost: with a CUDA build of torch.
A CPU-only torch has no CUDA tensors to be slow on, and ``SN_CUDA_DISABLE=1`` is a choice:
neither warns.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, json, os, sys, warnings
    cases = json.loads(sys.argv[1])  # [[case, error, env], ...]

    ERRORS = {
        "missing": lambda: ModuleNotFoundError("No module named 'sn_cuda._C'", name="sn_cuda._C"),
        "shared_library": lambda: ImportError(
            "libcudart.so.13: cannot open shared object file: No such file or directory"),
        "os_error": lambda: OSError("[Errno 2] No such file or directory: 'libc10_cuda.so'"),
        "other_torch": lambda: ImportError(
            "/site-packages/sn_cuda/_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv"),
        "registration": lambda: RuntimeError(
            "Tried to register an operator (sn_cuda::power_iteration) with the same name twice"),
    }
    error = None

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "sn_cuda._C" and error is not None:
                raise ERRORS[error]()
            return None

    sys.meta_path.insert(0, Refuse())
    import torch
    real_version = (torch.version.cuda, torch.version.hip)

    def same_as_torch(device):
        # sn_cuda's drop-ins against torch's flavours over a few training steps.
        import sn_cuda, sn_cuda.legacy
        results = []
        for ours_fn, torch_fn in [
            (sn_cuda.spectral_norm, torch.nn.utils.parametrizations.spectral_norm),
            (sn_cuda.legacy.spectral_norm, torch.nn.utils.spectral_norm),
        ]:
            outs = []
            for fn in (torch_fn, ours_fn):
                torch.manual_seed(0)
                m = fn(torch.nn.Linear(6, 5)).to(device)
                torch.manual_seed(1)
                y = [m(torch.randn(3, 6, device=device)) for _ in range(3)]
                y[-1].sum().backward()
                outs.append(torch.cat([t.flatten() for t in y] + [p.grad.flatten() for p in m.parameters()]
                                      + [b.flatten() for b in m.buffers()]))
            exact = torch.equal(outs[0], outs[1])
            results.append(exact if device == "cpu" else bool(torch.allclose(outs[0], outs[1], 1e-5, 1e-6)))
        return all(results)

    results = {}
    for case, error, env in cases:
        os.environ.pop("SN_CUDA_DISABLE", None)
        os.environ.update(env)
        schemas = sys.modules.get("sn_cuda.schemas")
        if case == "stale":  # the module on disk was built for other op schemas than these
            real_fingerprint = schemas.fingerprint
            schemas.fingerprint = lambda: "0" * 16
        # What a CPU build of torch reports, for that case only.
        torch.version.cuda, torch.version.hip = (None, None) if case == "cpu_only_torch" else real_version
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if "sn_cuda" not in sys.modules:
                import sn_cuda  # the first case: the import itself
            else:  # the others: the loader's module-level code runs again
                importlib.reload(sys.modules["sn_cuda._extension"])
        if case == "stale":
            schemas.fingerprint = real_fingerprint
        from sn_cuda import _extension, ops
        backend = sys.modules["sn_cuda"].backend()
        weight = torch.randn(3, 4, device="cuda") if torch.cuda.is_available() else None
        results[case] = {
            "warnings": [str(w.message) for w in caught
                         if issubclass(w.category, RuntimeWarning) and "sn_cuda" in str(w.message)],
            "backend": str(backend),
            "reason": backend.reason,
            "loaded": _extension.LOADED,
            "kernels_for_cuda": None if weight is None else ops.uses_kernels(weight),
            "cpu_same_as_torch": same_as_torch("cpu"),
            "cuda_same_as_torch": same_as_torch("cuda") if torch.cuda.is_available() else None,
        }
    print(json.dumps(results))
    """
)

# Whether the torch running the tests is a CUDA (or ROCm) build: then an absent build warns.
CUDA_TORCH = int(torch.version.cuda is not None or torch.version.hip is not None)

# case -> (error the finder raises, environment, warnings expected, words the reason holds)
CASES = {
    "missing": ("missing", {}, CUDA_TORCH, ["not installed"]),
    "cpu_only_torch": ("missing", {}, 0, ["not installed"]),
    "shared_library": ("shared_library", {}, 1, ["failed to load", "libcudart.so.13"]),
    "os_error": ("os_error", {}, 1, ["failed to load", "OSError", "libc10_cuda.so"]),
    "other_torch": ("other_torch", {}, 1, ["built for another torch", "undefined symbol", "rebuild"]),
    "registration": ("registration", {}, 1, ["failed to load", "RuntimeError", "register"]),
    "disabled": ("none", {"SN_CUDA_DISABLE": "1"}, 0, ["SN_CUDA_DISABLE"]),
}
if importlib.util.find_spec("sn_cuda._C") is not None:
    # A real build, whose stamp does not match (the case changes the schemas' fingerprint):
    # not even loaded, since loading it next to other schemas can abort the process.
    CASES["stale"] = (None, {}, 1, ["another version of sn_cuda", "rebuild"])


@pytest.fixture(scope="module")
def runs():
    """Every case, in order, in one fresh interpreter (importing torch takes seconds)."""
    cases = [[case, error, env] for case, (error, env, _, _) in CASES.items()]
    environ = {k: v for k, v in os.environ.items() if k != "SN_CUDA_DISABLE"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cases)],
        env=environ, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_falls_back_to_the_reference_with_one_warning(case, runs):
    result = runs[case]
    _, _, n_warnings, words = CASES[case]
    assert len(result["warnings"]) == n_warnings, result["warnings"]
    assert not result["loaded"]
    assert result["backend"] == "torch"
    for word in words:
        assert word in result["reason"], result["reason"]
    for message in result["warnings"]:
        assert result["reason"] in message and "SN_CUDA_DISABLE" in message
    assert result["kernels_for_cuda"] in (None, False)
    assert result["cpu_same_as_torch"]
    assert result["cuda_same_as_torch"] in (None, True)


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_falls_back_on_the_gpu(case, runs):
    # Where there is a GPU: CUDA weights go to the reference, with torch's numbers.
    assert runs[case]["kernels_for_cuda"] is False
    assert runs[case]["cuda_same_as_torch"] is True
