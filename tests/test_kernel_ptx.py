"""Properties of the kernels' code that no CPU test can see, checked in the PTX nvcc emits for
sm_90 (no GPU needed). Skipped without nvcc and torch's CUDA headers (CI has both).

- The elementwise kernels (W/σ, ∂L/∂W) read and write 16 bytes per access on their aligned
  path: each instantiation of the divide and gradient kernels must hold at least
  ``kElementUnroll`` (4) 16-byte loads and as many 16-byte stores. Found with nvcc 13.0:
  written as plain struct copies, every store and the loads of float16/bfloat16 were split into
  one scalar access per element, which costs bandwidth on the largest layers (BigGAN's).
  ``load_pack``/``store_pack`` in csrc/cuda/device_utils.cuh keep them whole.
- No kernel has a stack frame or spills registers, on sm_80 and sm_90 (ptxas's own report).
  The layer table is a kernel parameter of up to 25 KB, indexed by a runtime layer number: it
  must be read in place (``ld.param``), never copied into every thread's local memory, which
  nvcc does when a parameter's address escapes and it is not ``__grid_constant__``. (nvcc 13.0
  reads it in place here even without the qualifier, because every use inlines.) A spill was
  found this way: ptxas's default occupancy target made matvec_cols_kernel spill a register.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNROLL = 4  # kElementUnroll, csrc/layer_table.h


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("nvcc")


def _include_dirs() -> list[str]:
    from torch.utils import cpp_extension

    dirs = [os.path.join(ROOT, "csrc"), sysconfig.get_paths()["include"]]
    try:
        dirs += cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch before 2.6: include_paths(cuda=True)
        dirs += cpp_extension.include_paths(cuda=True)
    try:
        import nvidia

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    return dirs


def _nvcc_run(source: str, out, *args: str) -> str:
    """Compiles ``source`` as setup.py would, with ``args`` (the output kind and target);
    returns what nvcc printed."""
    nvcc = _nvcc()
    if nvcc is None or torch.version.cuda is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    cmd = [nvcc, *args, "-std=c++20", "-O3", "--expt-relaxed-constexpr",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           *(f"-I{d}" for d in _include_dirs()), os.path.join(ROOT, source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ptx(source: str, tmp_path) -> str:
    """The PTX of ``source`` for sm_90."""
    out = tmp_path / "kernel.ptx"
    _nvcc_run(source, out, "-ptx", "-arch=sm_90")
    return out.read_text()


def _ptxas_report(source: str, arch: str, tmp_path) -> dict[str, tuple[int, int, int]]:
    """{mangled kernel name: (stack frame, spill store, spill load bytes)} from ptxas -v."""
    log = _nvcc_run(source, tmp_path / "kernel.cubin", "-cubin", f"-arch={arch}", "-Xptxas", "-v")
    found = re.findall(
        r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
        r"(\d+) bytes spill loads", log)
    return {name: tuple(int(x) for x in sizes) for name, *sizes in found}


def _entries(ptx: str, kernel: str) -> dict[str, str]:
    """{mangled name: body} of each instantiation of ``kernel``."""
    bodies = {}
    for match in re.finditer(r"\.entry (\S*" + kernel + r"\S*)\(", ptx):
        end = ptx.find("\n}", match.end())
        bodies[match.group(1)] = ptx[match.end():end]
    return bodies


# fp64, fp32, fp16 and bf16, each with the three layer table sizes (layer_table.h).
INSTANTIATIONS = 12

# (source, kernel, 16-byte loads and stores each instantiation must hold at least)
KERNELS = [
    ("csrc/cuda/normalize.cu", "divide_kernel", UNROLL, UNROLL),  # W, then W/σ
    ("csrc/cuda/normalize_backward.cu", "grad_dot_kernel", 2 * UNROLL, 0),  # G and W/σ
    ("csrc/cuda/normalize_backward.cu", "grad_weight_kernel", UNROLL, UNROLL),  # G, then ∂L/∂W
]
VECTOR_LOAD = re.compile(r"ld\.global(\.nc)?\.(v4\.u32|v4\.f32|v2\.f64)")
VECTOR_STORE = re.compile(r"st\.global(\.cg)?\.(v4\.u32|v4\.f32|v2\.f64)")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    cache = {}

    def get(source):
        if source not in cache:
            cache[source] = _ptx(source, tmp_path_factory.mktemp("ptx"))
        return cache[source]

    return get


@pytest.mark.parametrize("source, kernel, min_loads, min_stores", KERNELS, ids=[k[1] for k in KERNELS])
def test_aligned_path_uses_16_byte_accesses(source, kernel, min_loads, min_stores, ptx):
    entries = _entries(ptx(source), kernel)
    assert len(entries) == INSTANTIATIONS, f"expected {INSTANTIATIONS} instantiations, got {list(entries)}"
    for name, body in entries.items():
        loads, stores = len(VECTOR_LOAD.findall(body)), len(VECTOR_STORE.findall(body))
        assert loads >= min_loads, f"{name}: {loads} 16-byte loads, expected >= {min_loads}"
        assert stores >= min_stores, f"{name}: {stores} 16-byte stores, expected >= {min_stores}"


SOURCES = {
    "csrc/cuda/power_iteration.cu": ("matvec_rows_kernel", "matvec_cols_kernel"),
    "csrc/cuda/normalize.cu": ("divide_kernel",),
    "csrc/cuda/normalize_backward.cu": ("grad_dot_kernel", "grad_weight_kernel"),
}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", list(SOURCES), ids=[os.path.basename(s) for s in SOURCES])
def test_no_stack_frame_or_spills(source, arch, tmp_path):
    report = _ptxas_report(source, arch, tmp_path)
    for kernel in SOURCES[source]:
        entries = {name: sizes for name, sizes in report.items() if kernel in name}
        assert len(entries) == INSTANTIATIONS, f"{kernel}: expected {INSTANTIATIONS} instantiations, got {list(entries)}"
        for name, (stack, spill_stores, spill_loads) in entries.items():
            assert (stack, spill_stores, spill_loads) == (0, 0, 0), (
                f"{name} on {arch}: {stack} bytes stack frame, {spill_stores} bytes spill stores, "
                f"{spill_loads} bytes spill loads (a copied table parameter or register spills)"
            )
