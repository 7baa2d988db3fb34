#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a machine with one (an H200 here): build the
# extension (pip and CMake), the CUDA tests, compute-sanitizer on a many-layer case, and the
# quick benchmark. Run from the repository root; results go to $OUT (default /tmp/sn_cuda_gpu_check),
# at most 8 files: summary.txt, build_pip.log, build_cmake.log, pytest.log, sanitizer.log,
# bench.log, bench.json. Every step has its own time limit and a failed step does not stop
# the next ones; summary.txt lists each step's status and duration. Typically ~6 minutes; no
# step runs past DEADLINE seconds (default 560) after the start.
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
DEADLINE="${DEADLINE:-560}"
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

# 1-2. The two builds, side by side (16 cores; each compiles three .cu files).
: > "$OUT/build_cmake.log"
if command -v cmake >/dev/null 2>&1; then
  ( step "build (cmake)" 300 "$OUT/build_cmake.log" scripts/build_cmake.sh ) &
  cmake_pid=$!
else
  echo "cmake not found" >> "$OUT/build_cmake.log"
  printf '%-22s %-22s\n' "build (cmake)" "SKIPPED (no cmake)" >> "$SUMMARY"
  cmake_pid=""
fi
: > "$OUT/build_pip.log"
step "build (pip -e)" 300 "$OUT/build_pip.log" \
  env SN_CUDA_BUILD=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
if [ -n "$cmake_pid" ]; then wait "$cmake_pid" || true; fi
# (the cmake step ran in a subshell: count its failure from the summary line)
if grep -q '^build (cmake) *\(FAILED\|TIMEOUT\)' "$SUMMARY"; then failures=$((failures + 1)); fi

# The kernels must be what runs CUDA tensors here; else every cuda test would merely skip.
: > "$OUT/pytest.log"
step "backend is cuda" 60 "$OUT/pytest.log" "$PYTHON" -c \
  'import sys, sn_cuda; b = sn_cuda.backend(); print("backend:", b, "-", b.reason); sys.exit(b != "cuda")'
grep '^backend:' "$OUT/pytest.log" | sed 's/^/    /' >> "$SUMMARY"

# 3. The CUDA tests.
step "pytest -m cuda" 240 "$OUT/pytest.log" \
  env SN_CUDA_REQUIRE_EXTENSION=1 "$PYTHON" -m pytest -m cuda -x -q -ra -p no:cacheprovider tests/
tail -n 3 "$OUT/pytest.log" | sed 's/^/    /' >> "$SUMMARY"

# 4. compute-sanitizer on the many-layer case.
: > "$OUT/sanitizer.log"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer")"
if [ -x "$SANITIZER" ]; then
  for tool in memcheck racecheck initcheck; do
    step "sanitizer $tool" 100 "$OUT/sanitizer.log" \
      "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" scripts/sanitizer_case.py
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitizer_case:" "$OUT/sanitizer.log" | tail -n 2 | sed 's/^/    /' >> "$SUMMARY"
  done
else
  echo "compute-sanitizer not found" >> "$OUT/sanitizer.log"
  printf '%-22s %-22s\n' "sanitizer" "SKIPPED (not found)" >> "$SUMMARY"
fi

# 5. The quick benchmark (torch.compile's first calls alone take ~45 s on the H200).
: > "$OUT/bench.log"
step "bench --quick" 200 "$OUT/bench.log" \
  "$PYTHON" -m sn_cuda bench --quick --device cuda --json "$OUT/bench.json"

echo >> "$SUMMARY"
echo "total ${SECONDS}s, $failures step(s) failed" >> "$SUMMARY"
cat "$SUMMARY"
exit $((failures > 0 ? 1 : 0))
