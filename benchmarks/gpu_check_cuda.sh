#!/usr/bin/env bash
# Folded into gpu_check.sh, which builds the CUDA extension and runs every GPU test (the CUDA ones included) in the
# same lease as the kernel benchmark; kept so that older instructions still work.
#   OUT=/some/dir bash benchmarks/gpu_check_cuda.sh
exec bash "$(dirname "$0")/gpu_check.sh" "$@"
