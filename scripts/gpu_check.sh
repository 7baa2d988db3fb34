#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a machine with one (an H200 here): build the
# extension, the CUDA tests, compute-sanitizer on a many-layer case, and the quick benchmark.
# Run from the repository root; results go to $OUT (default /tmp/sn_cuda_gpu_check): summary.txt,
# build.log, pytest.log, sanitizer.log, bench.log, bench.json. Every step has its own time
# limit and a failed step does not stop the next ones; summary.txt lists each step's status
# and duration. Sized for one call of timeout_s=540 in a session's 15 device minutes (a
# machine's start takes one or two), with time left for a short rerun: no step runs past
# DEADLINE seconds (default 480) after the start. Steps in order of what matters most: the
# kernel tests, the other CUDA tests, the sanitizer, then the benchmark; the slow CUDA tests
# (inductor compiles) last, with what time is left.
# The CMake build is not repeated here: CI builds it on every commit (scripts/build_cmake.sh).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-${TMPDIR:-/tmp}/sn_cuda_gpu_check}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
# PYTHON and CUDA_HOME, found as build_cmake.sh finds them (CUDA_HOME may stay empty here:
# the steps that need it fail on their own and the others still run).
. scripts/env.sh
: "${PYTHON:?no python with torch found}"
export PATH="${CUDA_HOME:+$CUDA_HOME/bin:}$PATH"
export MAX_JOBS="${MAX_JOBS:-16}"
# Only the GPU at hand (sm_90): half the device code to compile. CI builds sm_80 and sm_90.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  echo "CUDA_HOME=${CUDA_HOME:-not found} nvcc: $("${CUDA_HOME:-.}/bin/nvcc" --version 2>&1 | tail -n 1)"
  echo
} >> "$SUMMARY"

failures=0
# The whole script must end within one remote call (600 s): no step runs past DEADLINE.
DEADLINE="${DEADLINE:-480}"
# step NAME LIMIT_SECONDS LOG COMMAND...: run with a time limit, log stdout+stderr, record status.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local start=$SECONDS
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    printf '%-22s %-22s\n' "$name" "SKIPPED (no time left)" >> "$SUMMARY"
    failures=$((failures + 1))
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name: $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT after ${limit}s"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
  [ "$status" = "ok" ] || failures=$((failures + 1))
  printf '%-22s %-22s %4ds  (%s)\n' "$name" "$status" "$((SECONDS - start))" "$(basename "$log")" >> "$SUMMARY"
  return 0
}

# 1. The build (16 cores: the .cu files and csrc/autograd.cpp compile side by side).
step "build (pip -e)" 200 "$OUT/build.log" \
  env SN_CUDA_BUILD=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .

# The kernels must be what runs CUDA tensors here; else every cuda test would merely skip.
: > "$OUT/pytest.log"
step "backend is cuda" 60 "$OUT/pytest.log" "$PYTHON" -c \
  'import sys, sn_cuda; b = sn_cuda.backend(); print("backend:", b, "-", b.reason); sys.exit(b != "cuda")'
grep '^backend:' "$OUT/pytest.log" | sed 's/^/    /' >> "$SUMMARY"

# pytest NAME LIMIT ARGS...: the CUDA tests, up to 20 failures (a first run should show how
# far a bug reaches, not stop at the first), one minute at most per test where pytest-timeout
# is installed (the H200 image has it).
PYTEST=("$PYTHON" -m pytest -q -ra -p no:cacheprovider --maxfail=20)
if "$PYTHON" -c 'import pytest_timeout' >/dev/null 2>&1; then PYTEST+=(--timeout=60); fi
pytest_step() {
  local name="$1" limit="$2"
  shift 2
  step "$name" "$limit" "$OUT/pytest.log" env SN_CUDA_REQUIRE_EXTENSION=1 "${PYTEST[@]}" "$@"
  grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | tail -n 5 | sed 's/^/    /' >> "$SUMMARY"
  tail -n 1 "$OUT/pytest.log" | sed 's/^/    /' >> "$SUMMARY"
}

# 2. The kernels against the float64 reference.
pytest_step "pytest kernels" 120 -m cuda tests/test_kernels_cuda.py

# 3. Every other CUDA test: the modules, batching, AMP, CUDA graphs, determinism, ...
pytest_step "pytest cuda" 150 -m "cuda and not slow" --ignore=tests/test_kernels_cuda.py tests/

# 4. compute-sanitizer on the many-layer case, without torch's caching allocator (memcheck
# cannot see an access past a tensor that stays inside a cached block). On the gVisor runtime
# the sanitizer refuses the device (the device tool's notes say so): a probe says so instead of three failed steps.
: > "$OUT/sanitizer.log"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer")"
SAN=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER")
if [ -x "$SANITIZER" ]; then
  # The probe's output to a file, then grep: no pipe whose status pipefail could misread.
  timeout 60 "${SAN[@]}" --tool memcheck "$PYTHON" -c \
    'import torch; torch.zeros(1, device="cuda"); torch.cuda.synchronize()' > "$OUT/sanitizer_probe.log" 2>&1
  if grep -q "ERROR SUMMARY: 0" "$OUT/sanitizer_probe.log"; then
    for tool in memcheck racecheck; do
      step "sanitizer $tool" 60 "$OUT/sanitizer.log" \
        "${SAN[@]}" --tool "$tool" --error-exitcode 1 "$PYTHON" scripts/sanitizer_case.py
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitizer_case:" "$OUT/sanitizer.log" | tail -n 2 | sed 's/^/    /' >> "$SUMMARY"
    done
  else
    printf '%-22s %-22s\n' "sanitizer" "SKIPPED (refuses the device: sanitizer_probe.log)" >> "$SUMMARY"
    SANITIZER=/nonexistent/compute-sanitizer  # nor initcheck below
  fi
else
  echo "compute-sanitizer not found" >> "$OUT/sanitizer.log"
  printf '%-22s %-22s\n' "sanitizer" "SKIPPED (not found)" >> "$SUMMARY"
fi

# 5. The quick benchmark, without torch.compile (its first calls alone take ~45 s).
: > "$OUT/bench.log"
step "bench --quick" 70 "$OUT/bench.log" \
  "$PYTHON" -m sn_cuda bench --quick --device cuda --json "$OUT/bench.json" \
  --method torch_hook torch_param sn_cuda_layer sn_cuda_batched

# 6. With what time is left: the slow CUDA tests (inductor) and initcheck.
pytest_step "pytest cuda slow" 120 -m "cuda and slow" tests/
if [ -x "$SANITIZER" ]; then
  step "sanitizer initcheck" 60 "$OUT/sanitizer.log" \
    "${SAN[@]}" --tool initcheck --error-exitcode 1 "$PYTHON" scripts/sanitizer_case.py
fi

# 7. This machine's host: what the op boundary costs around the kernels (bench/RESULTS.md has
# the CPU machine's numbers; the host-time targets depend on it).
step "host floor" 90 "$OUT/bench.log" "$PYTHON" bench/dispatch_floor.py
grep -E '^\| (1|11|64|sngan_cifar_resnet_d|many_small) \|' "$OUT/bench.log" | sed 's/^/    /' >> "$SUMMARY"

echo >> "$SUMMARY"
echo "total ${SECONDS}s, $failures step(s) failed" >> "$SUMMARY"
cat "$SUMMARY"
exit $((failures > 0 ? 1 : 0))
