# Sourced (not run) by build_cmake.sh and gpu_check.sh: finds the interpreter and the CUDA
# toolkit the way both need them, and leaves whether a miss is fatal to the caller. Sets and
# exports PYTHON and CUDA_HOME unless already set; either is left empty when none is found.

# The interpreter that holds torch (a bare `python` may be another one).
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PYTHON="$(command -v "$candidate")"
      break
    fi
  done
fi

# CUDA_HOME: the toolkit whose bin/nvcc and include/cuda_runtime.h exist (a PATH nvcc may be
# a wrapper script outside the toolkit, so try the usual homes first).
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_on_path="$(command -v nvcc || true)"
  for candidate in "${CUDA_PATH:-}" /usr/local/cuda \
      "$( [ -n "$nvcc_on_path" ] && dirname "$(dirname "$(readlink -f "$nvcc_on_path")")" )"; do
    if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      CUDA_HOME="$candidate"
      break
    fi
  done
fi

export PYTHON="${PYTHON:-}" CUDA_HOME="${CUDA_HOME:-}"
