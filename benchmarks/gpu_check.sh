#!/usr/bin/env bash
# The one GPU check, for a bare GPU machine (no internet) on a 15-minute lease: at most 7 minutes in all.
#
#   OUT=$OUT bash benchmarks/gpu_check.sh          # the device tool: run(command=..., timeout_s=480), then give_back
#
# 1. build the CUDA extension (csrc/) into an editable install, for the detected GPU's arch (~22 s on an H200);
# 2. the GPU tests: TRITON_INTERPRET=0 PERCEIVER_FAST_REQUIRE_CUDA_EXT=1 pytest -m gpu -n 8 (~96 s for 151 tests);
# 3. the kernel benchmark's gpu preset with --write-dispatch-table: the candidate table goes into the tarball, not
#    into the package (a person reviews it, then commits it under perceiver_fast/kernels/dispatch_tables/); then the
#    decoding-step benchmark (fused decode kernel), which adds the table's decode-step rows (~30 s);
# 4. optional: a compact generation benchmark (GENERATE=0 skips it), only with the time left over;
# 5. everything (logs, JSON, plots, the table) packed into ONE tarball, $OUT/gpu-check.tar.gz, since the device tool
#    returns at most 8 files, plus $OUT/summary.txt; the summary is printed last.
#
# Every step runs under `timeout`, capped by a deadline that the whole script keeps: CHECK_SECONDS (default 420).
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: detected), CUDA_HOME (default: the toolkit
# of the nvcc on PATH), BENCH_ARGS (added to the kernel benchmark's command), GENERATE=0.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
CHECK_SECONDS=${CHECK_SECONDS:-420}
. benchmarks/gpu_common.sh
gpu_setup

# --- 1. build ------------------------------------------------------------------------------------------------------
gpu_build 90 300

# --- 2. GPU tests --------------------------------------------------------------------------------------------------
# One tile per Triton kernel (no autotuning): the tests are about correctness, and each variant compiles once.
workers=(-n 8)
"$PY" -c "import xdist" 2> /dev/null || workers=()
step=$(date +%s)
TRITON_INTERPRET=0 PERCEIVER_FAST_REQUIRE_CUDA_EXT=1 PERCEIVER_FAST_TRITON_AUTOTUNE=0 \
  timeout -k 10 "$(allow 140 170)" "$PY" -m pytest -m gpu "${workers[@]}" -q -rfE -p no:cacheprovider \
  > "$WORK/pytest-gpu.log" 2>&1
tests_rc=$?
tests_s=$(($(date +%s) - step))

# --- 3. kernel benchmark and the candidate dispatch table ------------------------------------------------------------
# The suite stops starting cases 50 s before its hard timeout, so its tables, JSON and plots are always written.
step=$(date +%s)
bench_timeout=$(allow 200 $((PACK_SECONDS + 45)))  # keeps 40 s for the decoding-step benchmark after it
TRITON_INTERPRET=0 timeout -k 10 "$bench_timeout" "$PY" -m benchmarks kernels --preset gpu \
  --time-limit $((bench_timeout > 80 ? bench_timeout - 50 : 30)) --flex-budget 45 --out "$WORK" \
  --write-dispatch-table --table-dir "$WORK/dispatch_tables" ${BENCH_ARGS:-} > "$WORK/bench-kernels.log" 2>&1
bench_rc=$?
bench_s=$(($(date +%s) - step))

# --- 3b. the decoding step: fused CUDA kernel vs composite vs SDPA + write + rotary; its decode-step table rows -------
step=$(date +%s)
TRITON_INTERPRET=0 timeout -k 5 "$(allow 40 $((PACK_SECONDS + 5)))" "$PY" -m benchmarks decode_step --out "$WORK" \
  --write-dispatch-table --table-dir "$WORK/dispatch_tables" > "$WORK/bench-decode-step.log" 2>&1
decode_rc="$? in $(($(date +%s) - step)) s"

# --- 4. optional: generation under auto in bf16, 8k and 32k, batch 1 and 16 -----------------------------------------
# With .whl/ carried (benchmarks/gpu_wheels.sh), perceiver-io's own cached generate runs beside ours on the same
# weights; its stack goes into a folder that only this step puts on the path.
generate_rc=skipped
if [ "${GENERATE:-1}" != 0 ] && (($(allow 120 "$PACK_SECONDS") >= 45)); then
  step=$(date +%s)
  site=$(parity_site)
  PYTHONPATH="${site:+$site:}$PYTHONPATH" TRITON_INTERPRET=0 timeout -k 5 "$(allow 120 "$PACK_SECONDS")" \
    "$PY" -m benchmarks generate --device cuda --dtype bf16 --contexts 8192 32768 --batch-sizes 1 16 --new-tokens 24 \
    --repeats 1 --skip uncached "pio exact" --out "$WORK" > "$WORK/generate.log" 2>&1
  generate_rc="$? in $(($(date +%s) - step)) s${site:+ (with perceiver-io)}"
fi

# --- 5. the summary, then one tarball ------------------------------------------------------------------------------
{
  summary_head "GPU tests" "$tests_rc in ${tests_s} s" "$WORK/pytest-gpu.log"
  echo "== decode step: exit $decode_rc"
  grep -E "^(copy|B[0-9])" "$WORK/bench-decode-step.log" | cut -c1-110 | head -n 13
  echo "== generate (optional): exit $generate_rc"
  [ -f "$WORK/generate.log" ] && grep -E "^(ours|floor|  ours)" "$WORK/generate.log" | head -n 40
  [ -f "$WORK/generate.log" ] && grep -A 12 "^GPU targets of the generation issue" "$WORK/generate.log"
  echo "== kernel benchmark: exit $bench_rc in ${bench_s} s (124 = timed out)"
  if grep -q "^== summary" "$WORK/bench-kernels.log"; then
    sed -n '/^== summary/,$p' "$WORK/bench-kernels.log" | grep -v "^wrote .*\.png$"
  else
    tail -n 30 "$WORK/bench-kernels.log"
  fi
} > "$WORK/summary.txt" 2>&1
gpu_pack
