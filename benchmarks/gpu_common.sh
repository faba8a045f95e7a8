# Shared by the GPU check scripts (sourced, not run): a deadline every step keeps, the machine's description, the
# CUDA extension's build, perceiver-io's wheels, and the one tarball a device call brings back.
#
# The sourcing script sets CHECK_SECONDS (its whole budget) first; it may set PYTHON, OUT, TORCH_CUDA_ARCH_LIST,
# CUDA_HOME. After `gpu_setup`: $PY, $OUT, $WORK (gathered here, packed by `gpu_pack`).

started=$(date +%s)
PACK_SECONDS=15  # the summary and the tarball

elapsed() { echo $(($(date +%s) - started)); }

# Seconds a step may take: at most $1, and never past the deadline less $2 seconds kept for the steps after it.
allow() {
  local most=$1 keep=$2 left
  left=$((CHECK_SECONDS - $(elapsed) - keep))
  ((left < most)) && most=$left
  ((most < 1)) && most=1
  echo "$most"
}

# The machine (into $WORK/device.txt), the arch to build for, and the CUDA toolkit.
gpu_setup() {
  PY=${PYTHON:-python3}
  OUT=${OUT:-$PWD/benchmarks/results/gpu-check}
  mkdir -p "$OUT"
  WORK=$(mktemp -d)  # gathered here and packed, so that only two files come back
  export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the tests and benchmarks run even if the install fails
  {
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    timeout 60 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'capability', '%d.%d' % torch.cuda.get_device_capability())"
  } > "$WORK/device.txt" 2>&1
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$(sed -n 's/.*capability \([0-9]*\.[0-9]*\).*/\1/p' "$WORK/device.txt" | head -n 1)
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  fi
  if [ -z "${CUDA_HOME:-}" ]; then
    # The nvcc on PATH may be a wrapper script: ask where it really lives rather than trusting its location.
    local nvcc_bin
    nvcc_bin=$(command -v nvcc || true)
    if [ -n "$nvcc_bin" ]; then
      CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")
      [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || CUDA_HOME=$(ls -d /usr/local/cuda* 2>/dev/null | head -n 1)
    fi
  fi
  export CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16}
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" >> "$WORK/device.txt"
}

# The CUDA extension (csrc/) into an editable install: `gpu_build MOST KEEP` sets build_rc and build_s. Skipped in a
# dry run on a CPU (DEVICE=cpu), which must not rebuild or reinstall the checkout it runs in.
gpu_build() {
  local step
  if [ "${DEVICE:-cuda}" = cpu ]; then
    build_rc="skipped (DEVICE=cpu)" build_s=0
    : > "$WORK/build.log"
    return
  fi
  step=$(date +%s)
  PERCEIVER_FAST_BUILD_CUDA=1 timeout -k 5 "$(allow "$1" "$2")" "$PY" -m pip install --no-deps --no-build-isolation \
    -e . > "$WORK/build.log" 2>&1
  build_rc=$?
  build_s=$(($(date +%s) - step))
}

# perceiver-io 0.11.0's stack from the carried .whl/ (benchmarks/gpu_wheels.sh) into a folder of its own, printed,
# which only the steps that compare with it put on their path (it shadows the machine's transformers 5); "" without.
parity_site() {
  compgen -G ".whl/*.whl" > /dev/null || return 0
  local site="$WORK/parity-site"
  [ -d "$site" ] && { echo "$site"; return 0; }
  # perceiver-io 0.11.0 declares Python < 3.11 and the GPU machine has 3.12: installed as the Makefile does here.
  timeout 60 "$PY" -m pip install --quiet --no-index --no-deps --ignore-requires-python --target "$site" .whl/*.whl \
    > "$WORK/wheels.log" 2>&1 \
    && echo "$site"
}

# The summary's first lines: the device, the build, and a test run (`summary_head LABEL "EXIT" LOG`).
summary_head() {
  echo "== device"
  cat "$WORK/device.txt"
  echo "== build: exit $build_rc in ${build_s} s (124 = timed out)"
  grep -E "perceiver_fast: built|CUDA build failed|rror" "$WORK/build.log" | head -n 5
  echo "== $1: exit $2 (124 = timed out; 5 = none collected)"
  [ -f "$3" ] || return 0
  tail -n 1 "$3"
  # Verbose runs name each test as it ends: counted here too, for a run its timeout cut short before pytest's summary.
  grep -qE " (PASSED|FAILED|ERROR|SKIPPED) " "$3" \
    && echo "per-test lines: $(grep -cE " PASSED " "$3") passed, $(grep -cE " FAILED " "$3") failed," \
      "$(grep -cE " ERROR " "$3") errors, $(grep -cE " SKIPPED " "$3") skipped"
  grep -E "^(FAILED|ERROR)" "$3" | head -n 25
  grep -qE "^(FAILED|ERROR)" "$3" || grep -E " (FAILED|ERROR) " "$3" | head -n 25
}

# What has finished so far, brought out now: `snapshot` writes the sourcing script's `summarize` into $OUT with a
# tarball of $WORK, so that a device call cut short (by its own limit, or the lease's) still brings back every finished
# step. gpu_pack, at the end, replaces both.
snapshot() {
  summarize > "$WORK/summary.txt" 2>&1
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  pack_tarball 2> /dev/null || true
}

# The tarball is written beside its name and renamed over it: a tar killed by its timeout leaves the previous
# snapshot whole instead of a truncated one.
pack_tarball() {
  timeout 10 tar -czf "$OUT/.gpu-check.tar.gz.part" -C "$WORK" . \
    && mv -f "$OUT/.gpu-check.tar.gz.part" "$OUT/gpu-check.tar.gz"
  local status=$?
  rm -f "$OUT/.gpu-check.tar.gz.part"
  return $status
}

# $WORK/summary.txt into $OUT, everything gathered into ONE tarball (a device call returns at most 8 files), the
# summary printed last.
gpu_pack() {
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  pack_tarball \
    && echo "== $OUT/gpu-check.tar.gz: $(du -h "$OUT/gpu-check.tar.gz" | cut -f1); $(elapsed) s in all" >> "$OUT/summary.txt"
  rm -rf "$WORK"
  cat "$OUT/summary.txt"
}
