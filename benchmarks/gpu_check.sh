#!/usr/bin/env bash
# One call on a bare GPU machine (no internet): install without dependencies, run the GPU tests, run the kernel
# benchmark, leave logs, JSON and plots under $OUT, and print a short summary last. Fits in ten minutes.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/benchmarks/results/gpu-check}
mkdir -p "$OUT"
# The tests' conftest defaults TRITON_INTERPRET to 1 (CPU CI); here the kernels must be compiled for the GPU.
export TRITON_INTERPRET=0 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || echo "pip install -e . failed (see install.log); running from PYTHONPATH" >> "$OUT/install.log"

# One tile per kernel in the tests (no autotuning): the grid is about correctness and compiles once per variant.
PERCEIVER_FAST_TRITON_AUTOTUNE=0 timeout 270 python3 -m pytest -m gpu -x -q -p no:cacheprovider \
  > "$OUT/pytest-gpu.log" 2>&1
tests_rc=$?

# BENCH_ARGS overrides the shape set, e.g. BENCH_ARGS="--preset full" when there is time for it.
left=$((560 - ($(date +%s) - started)))
# The suite stops starting cases 60 s before the hard timeout, so its table, JSON and plots are always written.
timeout "$left" python3 -m benchmarks kernels ${BENCH_ARGS:---preset gpu} --time-limit $((left - 60)) --out "$OUT" \
  > "$OUT/bench-kernels.log" 2>&1
bench_rc=$?

echo "== device"
cat "$OUT/device.txt"
echo "== GPU tests (exit $tests_rc; 124 = timed out): last lines of pytest-gpu.log"
grep -E "passed|failed|error|skipped" "$OUT/pytest-gpu.log" | tail -n 3
grep -E "^(FAILED|ERROR)" "$OUT/pytest-gpu.log" | head -n 5
echo "== kernel benchmark (exit $bench_rc; 124 = timed out), $(($(date +%s) - started)) s in all"
grep -E "^triton: skipped" "$OUT/bench-kernels.log"
if grep -q "^== summary" "$OUT/bench-kernels.log"; then
  sed -n '/^== summary/,/^wrote /p' "$OUT/bench-kernels.log"
else
  tail -n 25 "$OUT/bench-kernels.log"
fi
ls "$OUT"
