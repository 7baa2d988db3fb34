"""Build sn_cuda: the Python package, plus the CUDA extension ``sn_cuda._C`` when possible.

SN_CUDA_BUILD selects the extension build:
  unset / "auto"  build it when torch has CUDA and a CUDA toolkit is found, else skip quietly
  "1"             build it, and fail loudly if it cannot be built
  "0"             never build it (pure-Python package: the torch reference path)
TORCH_CUDA_ARCH_LIST defaults to "7.5;8.0;9.0+PTX" ("7.0;..." with CUDA 12: CUDA 13 has no sm_70):
machine code for Volta/Turing (V100, T4), Ampere/Ada (A100, L4, RTX 30xx/40xx), Hopper (H100/H200),
and Hopper's PTX, which the driver compiles at first use for newer GPUs (Blackwell). The kernels
need sm_70 or newer and CUDA >= 12.1 (toolkit and driver). SN_CUDA_DEBUG=1 adds -G -lineinfo.
The extension needs no GPU to compile: CI builds it on CPU-only machines.
"""

import glob
import os
import runpy
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_mode() -> str:
    mode = os.environ.get("SN_CUDA_BUILD", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"SN_CUDA_BUILD must be 'auto', '1' or '0', got {mode!r}")
    return mode


def _nvidia_include_dirs() -> list:
    """Headers torch's CUDA wheel ships in the ``nvidia`` pip packages (cuBLAS, cuSPARSE, ...),
    which ATen/cuda/CUDAContext.h includes and a bare toolkit may lack."""
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    dirs = []
    for base in list(getattr(nvidia, "__path__", [])):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))  # nvidia/cu13/include, ...
    return [d for d in dirs if os.path.isdir(d)]


def _extensions():
    mode = _build_mode()
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if mode == "1":
            raise RuntimeError("SN_CUDA_BUILD=1 but torch is not importable") from e
        return [], {}
    why_not = None
    if torch.version.cuda is None:
        why_not = "torch is a CPU-only build"
    elif tuple(int(x) for x in torch.version.cuda.split(".")[:2]) < (12, 1):
        # The kernels take their layer tables as kernel parameters of up to 25 KB.
        why_not = f"torch is built with CUDA {torch.version.cuda}; the kernels need CUDA >= 12.1"
    elif cpp_extension.CUDA_HOME is None:
        why_not = "no CUDA toolkit found (set CUDA_HOME)"
    if why_not:
        if mode == "1":
            raise RuntimeError(f"SN_CUDA_BUILD=1 but the CUDA extension cannot be built: {why_not}")
        print(f"sn_cuda: building the pure-Python package only ({why_not})", file=sys.stderr)
        return [], {}
    # Machine code runs on its own major version only (sm_80's on 8.6 and 8.9): without PTX a
    # newer GPU (sm_100, sm_120) would load the module and fail every launch.
    oldest = "7.5" if int(torch.version.cuda.split(".")[0]) >= 13 else "7.0"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{oldest};8.0;9.0+PTX")
    debug = os.environ.get("SN_CUDA_DEBUG", "0") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # No -std flag: torch's cpp_extension adds the C++ standard that its own headers need
    # (C++20 for recent torch, whose headers no longer compile as C++17).
    ext = cpp_extension.CUDAExtension(
        name="sn_cuda._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
        extra_compile_args={
            "cxx": ["-O3"] + (["-g"] if debug else []),
            "nvcc": ["-O3", "--expt-relaxed-constexpr"] + (["-G", "-lineinfo"] if debug else ["-lineinfo"]),
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": _stamping(cpp_extension.BuildExtension.with_options(use_ninja=True))}


def _stamping(build_ext):
    """``build_ext`` that writes, next to each built module, the fingerprint of the op schemas
    it was built for (sn_cuda/schemas.py): sn_cuda loads only a module whose stamp matches.
    The stamps are declared outputs, so that wheels and every editable mode carry them."""
    spec = runpy.run_path(os.path.join(ROOT, "sn_cuda", "schemas.py"))

    class BuildAndStamp(build_ext):
        def _stamps(self):
            """(stamp in the build tree, stamp next to the module in use) for each extension."""
            for ext in self.extensions:
                inplace, self.inplace = self.inplace, False
                built = self.get_ext_fullpath(ext.name)
                self.inplace = inplace
                yield built + spec["STAMP_SUFFIX"], self.get_ext_fullpath(ext.name) + spec["STAMP_SUFFIX"]

        def run(self):
            super().run()
            for paths in self._stamps():
                for path in set(paths):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        f.write(spec["fingerprint"]() + "\n")

        def get_outputs(self):
            return super().get_outputs() + [built for built, _ in self._stamps()]

        def get_output_mapping(self):
            mapping = super().get_output_mapping()
            if self.inplace:
                mapping.update(dict(self._stamps()))
            return mapping

    return BuildAndStamp


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
