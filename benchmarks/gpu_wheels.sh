#!/usr/bin/env bash
# Download, on this CPU machine (which reaches PyPI), the wheels that the perceiver-io 0.11.0 parity stack needs on a
# GPU machine (no internet; Python 3.12, x86-64; torch, numpy, tokenizers' and transformers' 5.x already installed
# there) into the ignored folder .whl/, so that a device call can carry them:
#
#   bash benchmarks/gpu_wheels.sh                        # then: run(command=..., carry=[".whl"])
#   (on the GPU) pip install --no-index --no-deps --ignore-requires-python --target "$SITE" .whl/*.whl && PYTHONPATH="$SITE:$PYTHONPATH" ...
#
# gpu_check.sh does the second line itself when .whl/ is there, for the steps that compare with perceiver-io: the
# target folder shadows the machine's transformers 5 (which breaks perceiver-io's generate) only for them.
# Pinned as requirements/parity.txt pins them for the CPU tests; `--no-deps` everywhere, so every dependency the
# machine lacks is listed here. fairscale has no wheel on PyPI: it is built here (pure Python). Kept under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PYTHON:-.venv/bin/python}
rm -rf "$DEST"
mkdir -p "$DEST"
binary=(--dest "$DEST" --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --abi none
  --platform any)
"$PY" -m pip download --quiet "${binary[@]}" --ignore-requires-python \
  perceiver-io==0.11.0 \
  transformers==4.44.2 "tokenizers>=0.19,<0.20" "huggingface-hub>=0.23,<1.0" \
  "pytorch-lightning>=2,<3" "lightning-utilities>=0.10" "torchmetrics>=0.9,<0.10" \
  "jsonargparse>=4.18,<5" docstring-parser typeshed-client einops regex
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DEST" fairscale==0.4.13
ls -1 "$DEST"
size_kib=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $((size_kib / 1024)) MiB"
if ((size_kib > 64 * 1024)); then
  echo "error: $DEST is over 64 MiB, more than a device call may carry" >&2
  exit 1
fi
