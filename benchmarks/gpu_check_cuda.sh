#!/usr/bin/env bash
# The CUDA C++ kernels (csrc/) on a bare GPU machine, in one call (no internet): build them with the package's
# editable install, run their GPU tests against the float64 oracle, print a short summary last. Logs under $OUT.
#   OUT=/some/dir bash benchmarks/gpu_check_cuda.sh
# CUDA_HOME defaults to the toolkit of the nvcc on PATH; TORCH_CUDA_ARCH_LIST to 9.0 (H100).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/benchmarks/results/gpu-check-cuda}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PERCEIVER_FAST_REQUIRE_CUDA_EXT=1  # the GPU tests fail, not skip, when the library did not build
started=$(date +%s)

if [ -z "${CUDA_HOME:-}" ]; then
  # The nvcc on PATH may be a wrapper script: ask it where its toolkit is rather than trusting its location.
  nvcc_bin=$(command -v nvcc || true)
  if [ -n "$nvcc_bin" ]; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")
    [ -x "$CUDA_HOME/bin/nvcc" ] || CUDA_HOME=$(ls -d /usr/local/cuda* 2>/dev/null | head -n 1)
  fi
fi
export CUDA_HOME TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  "$CUDA_HOME/bin/nvcc" --version | tail -n 2
} > "$OUT/device-cuda.txt" 2>&1

build_started=$(date +%s)
PERCEIVER_FAST_BUILD_CUDA=1 python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/install-cuda.log" 2>&1
install_rc=$?
build_s=$(($(date +%s) - build_started))
# Register and spill counts of what was built, for the record (the build itself is not strict here).
python3 csrc/build.py --out build/csrc-usage/_C.so --verbose --strict > "$OUT/ptxas-usage.log" 2>&1
usage_rc=$?

timeout $((560 - ($(date +%s) - started))) python3 -m pytest -m gpu -q -p no:cacheprovider \
  tests/kernels/test_cuda_gpu.py > "$OUT/pytest-cuda-gpu.log" 2>&1
tests_rc=$?

echo "== device"
cat "$OUT/device-cuda.txt"
echo "== build: pip install exit $install_rc in ${build_s} s; strict rebuild with ptxas -v exit $usage_rc"
grep -E "perceiver_fast: built|CUDA build failed|error" "$OUT/install-cuda.log" | head -n 5
grep -E "Used [0-9]+ registers" "$OUT/ptxas-usage.log" | sort | uniq -c | head -n 10
echo "== CUDA GPU tests (exit $tests_rc; 124 = timed out)"
grep -E "passed|failed|error|skipped" "$OUT/pytest-cuda-gpu.log" | tail -n 3
grep -E "^(FAILED|ERROR)" "$OUT/pytest-cuda-gpu.log" | head -n 10
echo "== $(($(date +%s) - started)) s in all"
ls "$OUT"
