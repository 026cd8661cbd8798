#!/usr/bin/env bash
# A single-machine Ray cluster bound to 127.0.0.1, with the job server (dashboard) on which `ray job submit` runs.
#
#   bash launch/start_local_ray.sh                  # head in the background; stop it with `ray stop`
#   bash launch/start_local_ray.sh --block          # in the foreground; Ctrl-C (or SIGTERM) stops it
#
# Settings (environment): RAY_NUM_CPUS (default: all cores), RAY_NUM_GPUS, RAY_PORT (GCS, 6379),
# RAY_DASHBOARD_PORT (8265), RAY_TEMP_DIR (/tmp/ray-metadistil). Other arguments go to `ray start`.
# Ray's workers inherit this environment: offline models, DeepSpeed on the CPU when there is no GPU, and the
# compiled-extension cache of the repository (scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ -x .venv/bin/ray ]; then
  export PATH="$PWD/.venv/bin:$PATH"  # `python` in a job's entrypoint is then this environment's
fi
args=(--head --port="${RAY_PORT:-6379}"
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
      --temp-dir="${RAY_TEMP_DIR:-/tmp/ray-metadistil}" --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
exec ray start "${args[@]}" "$@"
