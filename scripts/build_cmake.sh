#!/usr/bin/env bash
# Configure and build the CUDA extension with CMake (CMakeLists.txt) into build/cmake, against
# the torch installed for `python` (or $PYTHON), then checks that the module registers its
# kernels. CI runs it so that the CMake build cannot rot. Honours
# CUDA_HOME, MAX_JOBS and TORCH_CUDA_ARCH_LIST (default "7.5;8.0;9.0+PTX", as setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."

# PYTHON and CUDA_HOME, found as gpu_check.sh finds them.
. scripts/env.sh
: "${PYTHON:?no python with torch found}"
: "${CUDA_HOME:?set CUDA_HOME: no CUDA toolkit found}"
export CUDA_HOME CUDACXX="${CUDACXX:-$CUDA_HOME/bin/nvcc}"

generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
cmake -S . -B build/cmake "${generator[@]}" \
  -DPython3_EXECUTABLE="$PYTHON" -DCUDAToolkit_ROOT="$CUDA_HOME" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME"
cmake --build build/cmake --parallel "${MAX_JOBS:-2}"

# The module loads and registers a CUDA kernel for each op, normalize's autograd and
# power_iteration's ADInplaceOrView kernel (no GPU needed). SN_CUDA_DISABLE keeps sn_cuda from
# loading the pip-built module as well; importing sn_cuda defines the op schemas.
module="$(ls build/cmake/_C.*.so)"
SN_CUDA_DISABLE=1 "$PYTHON" - "$module" <<'PY'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("sn_cuda._C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import sn_cuda  # noqa: E402,F401  (the schemas, checked against the registered kernels)

expected = [(op, "CUDA", f"{op}.cu") for op in ("power_iteration", "normalize", "normalize_backward")]
expected += [("normalize", "Autograd[alias]", "autograd.cpp"), ("power_iteration", "ADInplaceOrView", "autograd.cpp")]
missing = [
    f"{op} {key}" for op, key, source in expected
    if not any(line.startswith(f"{key}:") and source in line
               for line in torch._C._dispatch_dump(f"sn_cuda::{op}").splitlines())
]
if missing:
    sys.exit(f"{sys.argv[1]}: no kernel registered from csrc for {missing}")
print(f"{sys.argv[1]}: kernels registered: {', '.join(f'{op} {key}' for op, key, _ in expected)}")
PY
