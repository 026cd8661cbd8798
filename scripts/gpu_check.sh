#!/usr/bin/env bash
# GPU acceptance check: install what the GPU path needs, check the Triton kernels on the device, benchmark them,
# run the main job under the deepspeed launcher and in one process, time a causal-LM MetaDistil step, and write
# one report (benchmarks/results/gpu_check/<UTC time>/report.{json,md}). The logic is in benchmarks/gpu_check.py;
# `bash scripts/gpu_check.sh --help` lists the options. Without a CUDA GPU: one line, exit status 2, at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
source scripts/env.sh
exec "$PYTHON" benchmarks/gpu_check.py "$@"
