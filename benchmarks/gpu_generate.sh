#!/usr/bin/env bash
# The GPU check of the generation issue, for a bare GPU machine (no internet): at most 7 minutes in all.
#
#   bash benchmarks/gpu_wheels.sh                      # here, first: perceiver-io's wheels into .whl/
#   OUT=$OUT bash benchmarks/gpu_generate.sh           # the device tool: run(command=..., carry=[".whl"], timeout_s=480)
#
# 1. build the CUDA extension (the fused decode kernel) into an editable install (~22 s on an H200);
# 2. the generation GPU tests: CUDA graphs against eager steps (tokens), graphs under autocast, held graphs, the fused
#    decode kernel's steps against the composite ones;
# 3. `python -m benchmarks generate` in bf16 on the REFERENCE.md model: 8k, 32k and 64k contexts, batch 1 and 16, every
#    mode with graphs and eagerly, our uncached path, and perceiver-io's cached generate on the same weights (with
#    .whl/); its output ends with the issue's GPU targets, each met or not;
# 4. the seed configuration (README's training command; 32.7M parameters at 8k) at 8k, batch 1;
# 5. the cached modes again with the fused decode kernel forced (PERCEIVER_FAST_DECODE_BACKEND=cuda), 8k and 32k;
# 6. logs, JSON and plots in ONE tarball, $OUT/gpu-check.tar.gz, plus $OUT/summary.txt, printed last.
#
# Every step runs under `timeout`, capped by a deadline that the whole script keeps: CHECK_SECONDS (default 420).
# Environment: PYTHON, TORCH_CUDA_ARCH_LIST, CUDA_HOME as for gpu_check.sh; DEVICE (default cuda), CONTEXTS (default
# "8192 32768 65536"), BATCHES ("1 16"), NEW_TOKENS (64), REPEATS (3) to try the script on a CPU with small sizes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
CHECK_SECONDS=${CHECK_SECONDS:-420}
. benchmarks/gpu_common.sh
gpu_setup
DEVICE=${DEVICE:-cuda}
read -r -a contexts <<< "${CONTEXTS:-8192 32768 65536}"
read -r -a batches <<< "${BATCHES:-1 16}"
short=("${contexts[@]:0:2}")  # the fused-kernel rerun: the two shortest contexts
generate=("$PY" -m benchmarks generate --device "$DEVICE" --dtype bf16 --new-tokens "${NEW_TOKENS:-64}"
  --repeats "${REPEATS:-3}" --out "$WORK")
site=$(parity_site)
with_pio() { PYTHONPATH="${site:+$site:}$PYTHONPATH" TRITON_INTERPRET=0 "$@"; }

# --- 1. build ------------------------------------------------------------------------------------------------------
gpu_build 90 330

# --- 2. the generation GPU tests -----------------------------------------------------------------------------------
workers=(-n 8)
"$PY" -c "import xdist" 2> /dev/null || workers=()
step=$(date +%s)
if [ "$DEVICE" = cpu ]; then  # a dry run: the GPU tests would all skip
  echo "skipped (DEVICE=cpu)" > "$WORK/pytest-gpu-generation.log"
  tests_rc="skipped"
else
  TRITON_INTERPRET=0 PERCEIVER_FAST_TRITON_AUTOTUNE=0 timeout -k 10 "$(allow 90 260)" \
    "$PY" -m pytest -m gpu "${workers[@]}" -q -rfE -p no:cacheprovider tests/generation \
    > "$WORK/pytest-gpu-generation.log" 2>&1
  tests_rc="$? in $(($(date +%s) - step)) s"
fi

# --- 3. the reference model: every mode, graphs and eager, uncached, perceiver-io ----------------------------------
# perceiver-io's uncached generate does not keep the documented schedule and its exact way is a full forward per
# token: neither bears on a GPU target, both would take minutes at 64k.
step=$(date +%s)
with_pio timeout -k 5 "$(allow 170 $((PACK_SECONDS + 75)))" "${generate[@]}" --contexts "${contexts[@]}" \
  --batch-sizes "${batches[@]}" --skip "pio uncached" "pio exact" > "$WORK/generate.log" 2>&1
reference_rc="$? in $(($(date +%s) - step)) s${site:+ (with perceiver-io)}"

# --- 4. the seed configuration ---------------------------------------------------------------------------------------
# A CPU dry run gives it the time left, and only the cheap rows: the seed model's full forwards (exact mode's
# hand-overs, the uncached path, the floor) take minutes on a CPU, where 40 s is a GPU's budget for all of them.
step=$(date +%s)
seed_seconds=40 seed_skip=("pio uncached" "pio exact")
[ "$DEVICE" = cpu ] && seed_seconds=$CHECK_SECONDS seed_skip+=(exact uncached floor)
with_pio timeout -k 5 "$(allow "$seed_seconds" $((PACK_SECONDS + 40)))" "${generate[@]}" --model seed \
  --contexts "${contexts[0]}" --batch-sizes 1 --skip "${seed_skip[@]}" > "$WORK/generate-seed.log" 2>&1
seed_rc="$? in $(($(date +%s) - step)) s"

# --- 5. the fused decode kernel, forced --------------------------------------------------------------------------------
step=$(date +%s)
if [ "$DEVICE" = cpu ]; then  # a dry run: the fused kernel runs on CUDA tensors only
  echo "skipped (DEVICE=cpu)" > "$WORK/generate-fused.log"
  fused_rc="skipped (DEVICE=cpu)"
else
  PERCEIVER_FAST_DECODE_BACKEND=cuda TRITON_INTERPRET=0 timeout -k 5 "$(allow 40 "$PACK_SECONDS")" "${generate[@]}" \
    --contexts "${short[@]}" --batch-sizes "${batches[@]}" --skip uncached pio --tag fused-decode \
    > "$WORK/generate-fused.log" 2>&1
  fused_rc="$? in $(($(date +%s) - step)) s"
fi

# --- 6. the summary, then one tarball ------------------------------------------------------------------------------
# The verdicts from each run's JSON, which a run cut short by its timeout has written up to its last finished block.
# Every run is named, so that one cut short before its first block shows as missing rather than not at all.
targets() {
  "$PY" -c 'import glob, json, sys
work = sys.argv[1]
for run, pattern, exit_status in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    paths = sorted(glob.glob(f"{work}/*-generate{pattern}.json"))
    if not paths:
        print(f"{run}: no results (exit {exit_status})")
    for path in paths:
        verdicts = json.load(open(path)).get("gpu_targets", {})
        print(f"{run} ({path.rsplit(chr(47), 1)[-1]}):", "" if verdicts else "no GPU targets (not a CUDA run)")
        for target, verdict in verdicts.items():
            print(f"  {target}: {verdict}")' "$WORK" \
    "reference model" "-bf16" "$reference_rc" "seed configuration" "-seed-bf16" "$seed_rc" \
    "fused decode kernel forced" "-bf16-fused-decode" "$fused_rc"
}
{
  summary_head "generation GPU tests" "$tests_rc" "$WORK/pytest-gpu-generation.log"
  echo "== reference model: exit $reference_rc"
  grep -E "^(ours|pio|floor|  ours)" "$WORK/generate.log" | head -n 80
  echo "== seed configuration: exit $seed_rc"
  grep -E "^(ours|pio|floor)" "$WORK/generate-seed.log" | head -n 12
  echo "== fused decode kernel forced: exit $fused_rc"
  grep -E "^ours" "$WORK/generate-fused.log" | head -n 30
  tail -n 3 "$WORK/generate-fused.log" | grep -iE "error|exception" || true
  echo "== the generation issue's GPU targets"
  targets
} > "$WORK/summary.txt" 2>&1
gpu_pack
