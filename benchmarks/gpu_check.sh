#!/usr/bin/env bash
# The one GPU check, for a bare GPU machine (no internet) on a 15-minute lease: at most 9 minutes by default (it took
# 6.5 on an H100 on 2026-11-28; a machine starts in about a minute).
#
#   OUT=$OUT bash benchmarks/gpu_check.sh          # the device tool: run(command=..., timeout_s=570), then give_back
#
# 1. build the CUDA extension (csrc/) into an editable install, for the detected GPU's arch (22-34 s);
# 2. the GPU tests: TRITON_INTERPRET=0 PERCEIVER_FAST_REQUIRE_CUDA_EXT=1 pytest -m gpu -n 8, one line per test
#    (1181 tests in about 175 s on an H100, most of it compiling Triton kernels, before the 29 cases that force each
#    autotune tile were added; up to 210 s);
# 3. the kernel benchmark's gpu preset with --write-dispatch-table: the candidate table goes into the tarball, not
#    into the package (a person reviews it, then commits it under perceiver_fast/kernels/dispatch_tables/; ~150 s);
#    then the decoding-step benchmark (fused decode kernel), which adds the table's decode-step rows (~16 s);
# 4. generation in bf16 at 8k and 32k, batch 1 and 16, every mode with graphs and eagerly, our uncached path and
#    perceiver-io's cached generate (with .whl/), then the seed configuration at 8k (55 s and 39 s without
#    perceiver-io): with the time kept for it (GENERATE_SECONDS) or left over; GENERATE=0 skips it. COMPILE_STEPS=1
#    adds rows whose steps are compiled by torch.compile (each kind compiles once: give it GENERATE_SECONDS);
#    benchmarks/gpu_generate.sh is the longer generation check;
# 5. everything (logs, JSON, plots, the table) packed into ONE tarball, $OUT/gpu-check.tar.gz, since the device tool
#    returns at most 8 files, plus $OUT/summary.txt; the summary is printed last. Both are also written after every
#    step, so that a call cut short brings back what finished.
#
# Every step runs under `timeout`, capped by a deadline that the whole script keeps: CHECK_SECONDS (default 540).
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: detected), CUDA_HOME (default: the toolkit
# of the nvcc on PATH), BENCH_ARGS (added to the kernel benchmark's command), KERNELS_SECONDS (the kernel benchmark's
# most, default 170), GENERATE_SECONDS (default 110), GENERATE=0, COMPILE_STEPS=1.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
CHECK_SECONDS=${CHECK_SECONDS:-540}
KERNELS_SECONDS=${KERNELS_SECONDS:-170} GENERATE_SECONDS=${GENERATE_SECONDS:-110}
. benchmarks/gpu_common.sh
gpu_setup

# The summary of what has run so far (into $WORK/summary.txt): written after every step, with a tarball, so that a
# call cut short still brings back what finished.
summarize() {
  summary_head "GPU tests" "$tests_rc in ${tests_s} s" "$WORK/pytest-gpu.log"
  echo "== decode step: exit $decode_rc"
  grep -E "^(copy|B[0-9])" "$WORK/bench-decode-step.log" 2> /dev/null | cut -c1-110 | head -n 13
  echo "== generate: exit $generate_rc; seed configuration: exit $seed_rc"
  grep -hE "^(ours|pio|floor|  ours)" "$WORK/generate.log" "$WORK/generate-seed.log" 2> /dev/null | head -n 60
  grep -h -A 20 "^GPU targets of the generation issue" "$WORK/generate.log" "$WORK/generate-seed.log" 2> /dev/null
  head -n 40 "$WORK/table-compare.txt" 2> /dev/null  # what committing the candidate table would change
  echo "== kernel benchmark: exit $bench_rc (124 = timed out)"
  if grep -q "^== summary" "$WORK/bench-kernels.log" 2> /dev/null; then
    sed -n '/^== summary/,$p' "$WORK/bench-kernels.log" | grep -v "^wrote .*\.png$"
  else
    tail -n 30 "$WORK/bench-kernels.log" 2> /dev/null
  fi
}
tests_rc=pending tests_s=0 bench_rc=pending decode_rc=pending generate_rc=pending seed_rc=pending

# --- 1. build ------------------------------------------------------------------------------------------------------
gpu_build 90 300
snapshot

# --- 2. GPU tests --------------------------------------------------------------------------------------------------
# One tile per Triton kernel (no autotuning): the tests are about correctness, and each variant compiles once. The
# files of the few model-level tests go first and the contract's thousand small calls last, one line per test, so that
# a run cut short by its timeout still names what passed and what failed.
workers=(-n 8)
"$PY" -c "import xdist" 2> /dev/null || workers=()
step=$(date +%s)
TRITON_INTERPRET=0 PERCEIVER_FAST_REQUIRE_CUDA_EXT=1 PERCEIVER_FAST_TRITON_AUTOTUNE=0 \
  timeout -k 10 "$(allow 210 220)" "$PY" -m pytest -m gpu "${workers[@]}" -v -rfE -p no:cacheprovider \
  tests/generation tests/kernels/test_cuda_gpu.py tests/kernels/test_triton_attention.py tests/kernels/test_decode.py \
  tests/test_train.py tests/test_cli.py tests/kernels/test_contract.py > "$WORK/pytest-gpu.log" 2>&1
tests_rc=$?
tests_s=$(($(date +%s) - step))
snapshot

# --- 3. kernel benchmark and the candidate dispatch table ------------------------------------------------------------
# The suite stops starting cases 45 s before its hard timeout, so its tables, JSON and plots are always written.
step=$(date +%s)
bench_timeout=$(allow "$KERNELS_SECONDS" $((PACK_SECONDS + 40 + $GENERATE_SECONDS)))
TRITON_INTERPRET=0 timeout -k 10 "$bench_timeout" "$PY" -m benchmarks kernels --preset gpu \
  --time-limit $((bench_timeout > 75 ? bench_timeout - 45 : 30)) --flex-budget 45 --out "$WORK" \
  --write-dispatch-table --table-dir "$WORK/dispatch_tables" ${BENCH_ARGS:-} > "$WORK/bench-kernels.log" 2>&1
bench_rc="$? in $(($(date +%s) - step)) s"
snapshot

# --- 3b. the decoding step: fused CUDA kernel vs composite vs SDPA + write + rotary; its decode-step table rows -------
step=$(date +%s)
TRITON_INTERPRET=0 timeout -k 5 "$(allow 40 $((PACK_SECONDS + 5 + $GENERATE_SECONDS)))" "$PY" -m benchmarks \
  decode_step --out "$WORK" --write-dispatch-table --table-dir "$WORK/dispatch_tables" > "$WORK/bench-decode-step.log" 2>&1
decode_rc="$? in $(($(date +%s) - step)) s"
for table in "$WORK"/dispatch_tables/sm*.json; do
  [ -f "$table" ] && timeout 30 "$PY" -m benchmarks.dispatch_table compare "$table" >> "$WORK/table-compare.txt" 2>&1
done
snapshot

# --- 4. generation under auto in bf16: 8k and 32k, batch 1 and 16, then the seed configuration at 8k -----------------
# GENERATE_SECONDS (0: only the time left over; GENERATE=0 skips it) is kept for it by the steps before. With
# .whl/ carried (benchmarks/gpu_wheels.sh), perceiver-io's own cached generate runs beside ours on the same weights;
# its stack goes into a folder that only this step puts on the path. Every mode with graphs and eagerly, and our
# uncached path (a cached mode must beat it); perceiver-io's uncached and exact ways bear on no target.
generate_rc=skipped seed_rc=skipped
if [ "${GENERATE:-1}" != 0 ] && (($(allow 150 "$PACK_SECONDS") >= 45)); then
  step=$(date +%s)
  site=$(parity_site)
  generate=("$PY" -m benchmarks generate --device cuda --dtype bf16 --new-tokens 32 --repeats 2 --out "$WORK")
  [ "${COMPILE_STEPS:-0}" = 1 ] && generate+=(--compile-steps)  # rows with torch.compile'd steps (compiles: slower)
  PYTHONPATH="${site:+$site:}$PYTHONPATH" TRITON_INTERPRET=0 timeout -k 5 "$(allow 150 $((PACK_SECONDS + 30)))" \
    "${generate[@]}" --contexts 8192 32768 --batch-sizes 1 16 --skip "pio uncached" "pio exact" \
    > "$WORK/generate.log" 2>&1
  generate_rc="$? in $(($(date +%s) - step)) s${site:+ (with perceiver-io)}"
  snapshot
  if (($(allow 40 "$PACK_SECONDS") >= 20)); then
    step=$(date +%s)
    PYTHONPATH="${site:+$site:}$PYTHONPATH" TRITON_INTERPRET=0 timeout -k 5 "$(allow 40 "$PACK_SECONDS")" \
      "${generate[@]}" --model seed --contexts 8192 --batch-sizes 1 --skip "pio uncached" "pio exact" \
      > "$WORK/generate-seed.log" 2>&1
    seed_rc="$? in $(($(date +%s) - step)) s"
  fi
fi

# --- 5. the summary, then one tarball ------------------------------------------------------------------------------
summarize > "$WORK/summary.txt" 2>&1
gpu_pack
