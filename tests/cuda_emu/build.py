"""Builds csrc/cuda/*.cu as plain C++ on the CUDA emulator (cuda_emu.h) and loads it.

``load(as_sn_cuda=False)``: the kernels register for CPU tensors under the test-only
namespace ``sn_cuda_emu`` (schemas defined here, the same as sn_cuda's), with
``sn_cuda_emu::set_schedule``. ``load(as_sn_cuda=True)``: they register as the CPU kernels
of sn_cuda's own ops, so that sn_cuda's modules, autograd and batching run them on CPU
tensors; only for a process of its own (module_parity.py). Built on first use (~30 s on two
cores) into build/cuda_emu/ of this checkout (not torch's per-user cache, which every checkout
would share), then reused while the sources are unchanged.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OPS = ("power_iteration", "normalize", "normalize_backward")


def unavailable(as_sn_cuda: bool = False) -> str | None:
    """Why the emulator cannot be built (or, ``as_sn_cuda``, run under sn_cuda's autograd)
    here, or None."""
    if as_sn_cuda:
        from sn_cuda import ops

        if not ops._NORMALIZE_HAS_AUTOGRAD:  # csrc/autograd.cpp, in the compiled extension
            return f"needs the compiled extension's C++ autograd: {ops._extension.LOAD_REASON}"
    if not sys.platform.startswith("linux"):
        return "the CUDA emulator needs Linux (ucontext)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "the CUDA emulator needs a C++ compiler"
    return None


def load(as_sn_cuda: bool = False):
    from torch.utils import cpp_extension

    from sn_cuda import ops

    sources = [os.path.join(HERE, f"{op}.cpp") for op in OPS]
    flags = ["-O1", "-DSN_CUDA_EMULATE", "-include", os.path.join(HERE, "cuda_emu.h"), "-Wno-unknown-pragmas"]
    lib = None
    if as_sn_cuda:
        flags.append("-DSN_CUDA_EMULATE_AS_SN_CUDA")
    else:
        sources.append(os.path.join(HERE, "schedule.cpp"))
        lib = torch.library.Library("sn_cuda_emu", "DEF")
        for schema in ops.SCHEMAS:
            lib.define(schema)
    name = "sn_cuda_emu_as_sn_cuda" if as_sn_cuda else "sn_cuda_emu"
    build_directory = os.path.join(ROOT, "build", "cuda_emu", name)
    os.makedirs(build_directory, exist_ok=True)
    cpp_extension.load(
        name=name,
        build_directory=build_directory,
        sources=sources,
        extra_cflags=flags,
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        is_python_module=False,
    )
    return lib  # keep it alive: it holds the sn_cuda_emu schemas
