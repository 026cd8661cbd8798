#!/usr/bin/env bash
# A single-machine Ray cluster with the job server (dashboard) on which `ray job submit` runs, and Ray's token
# authentication: every request to the dashboard, the GCS and the raylet must carry the cluster's token.
#
#   bash launch/start_local_ray.sh                  # head in the background; stop it with `ray stop`
#   bash launch/start_local_ray.sh --block          # in the foreground; Ctrl-C (or SIGTERM) stops it
#
# What listens where (Ray 2.60, measured with `ss -ltnp`; launch/README.md lists it): the dashboard on
# 127.0.0.1 only; the GCS, the raylet, the object manager, the Ray client server and the metrics ports on the
# machine's address or on all interfaces. Ray binds those so whatever it is told (it turns --node-ip-address
# 127.0.0.1 into the machine's address), so the token is what guards them; firewall them on a shared network.
#
# Settings (environment): RAY_NUM_CPUS (default: all cores), RAY_NUM_GPUS, RAY_PORT (GCS, 6379),
# RAY_DASHBOARD_PORT (8265), RAY_TEMP_DIR (/tmp/ray-metadistil); RAY_AUTH_TOKEN_PATH (the token file, default
# ~/.ray/auth_token, created with mode 600 when missing) or RAY_AUTH_TOKEN; RAY_AUTH_MODE=disabled to run
# without authentication. Clients (`ray job submit`, launch/submit_default.sh, a driver run by hand) need
# RAY_AUTH_MODE=token and the same token. Other arguments go to `ray start`.
# Ray's workers inherit this environment: offline models, DeepSpeed on the CPU when there is no GPU, the
# compiled-extension cache of the repository (scripts/env.sh), and the token settings.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ -x .venv/bin/ray ]; then
  export PATH="$PWD/.venv/bin:$PATH"  # `python` in a job's entrypoint is then this environment's
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  if [ ! -s "$token_file" ]; then
    mkdir -p "$(dirname "$token_file")"
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$token_file")
    echo "start_local_ray.sh: new Ray authentication token in $token_file"
  fi
fi
args=(--head --port="${RAY_PORT:-6379}"
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
      --temp-dir="${RAY_TEMP_DIR:-/tmp/ray-metadistil}" --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
exec ray start "${args[@]}" "$@"
