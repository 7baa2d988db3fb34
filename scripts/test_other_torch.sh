#!/usr/bin/env bash
# The README's test command against another torch release: a venv of its own, a clone of HEAD,
# the extension built against that torch's headers, then the whole test suite (CPU).
#
# Default 2.11.0: the torch of the H200 machine's image (python3 there has torch 2.11.0+cu130),
# against which scripts/gpu_check.sh builds the extension. Run it before a device session, so
# that the build step there is known to compile and the C++ autograd to pass, without spending
# device minutes. Needs PyPI (the venv downloads torch and its CUDA libraries, ~3 GB); CI does
# not run it. VENV_PYTHON picks the interpreter of the venv (the GPU machine's is Python 3.12:
# VENV_PYTHON=python3.12). Everything goes under build/torch-<version>-py<X.Y>/ (ignored by
# git); a rerun reuses the venv. Usage: [VENV_PYTHON=...] scripts/test_other_torch.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${1:-2.11.0}"
VENV_PYTHON="${VENV_PYTHON:-python3}"
PY_VERSION="$("$VENV_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
WORK="build/torch-$VERSION-py$PY_VERSION"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
. scripts/env.sh  # CUDA_HOME (PYTHON is this venv's below)

if [ ! -x "$WORK/venv/bin/python" ]; then
  "$VENV_PYTHON" -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q "torch==$VERSION" ninja "pytest>=7" "pytest-benchmark>=4" numpy
fi
PY="$WORK/venv/bin/python"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'

rm -rf "$WORK/repo"
git clone -q . "$WORK/repo"
cd "$WORK/repo"
CUDA_HOME="$CUDA_HOME" SN_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace
set +e
CUDA_HOME="$CUDA_HOME" PYTHONPATH=. SN_CUDA_REQUIRE_EXTENSION=1 "$PY" -m pytest tests/ -q -ra -p no:cacheprovider
rc=$?
set -e
[ "$rc" -ne 5 ] || rc=0  # no tests collected
exit "$rc"
