#!/usr/bin/env bash
# Submit the embedded default recipe (the MiniLM teacher and its 3-layer student on Rotten Tomatoes; KD and
# MetaDistil) as a Ray job: 2 workers, both models under DeepSpeed ZeRO-2. Start a cluster first
# (launch/start_local_ray.sh). Extra arguments go to the entry point, e.g.
#
#   bash launch/submit_default.sh --set student_train.max_steps=50
#   RAY_NUM_WORKERS=8 bash launch/submit_default.sh --use-gpu
#
# Settings (environment): RAY_DASHBOARD_ADDRESS (http://127.0.0.1:8265), RAY_NUM_WORKERS (2),
# RAY_STORAGE_PATH ($PWD/runs/ray: checkpoints, and the run folder <storage>/<name>/output); the cluster's token
# as for start_local_ray.sh (RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token, or RAY_AUTH_TOKEN;
# RAY_AUTH_MODE=disabled for a cluster without authentication).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/ray ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
address=${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}
# `ray job submit` to an address where nothing listens retries for a while and then prints a long traceback.
python - "$address" <<'PY' || exit 2
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

address = sys.argv[1]
request = urllib.request.Request(address.rstrip("/") + "/api/version")
if os.environ["RAY_AUTH_MODE"] == "token":
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    token = os.environ.get("RAY_AUTH_TOKEN") or (token_file.read_text().strip() if token_file.is_file() else "")
    request.add_header("Authorization", f"Bearer {token}")
try:
    urllib.request.urlopen(request, timeout=5).close()
except urllib.error.HTTPError as err:
    if err.code in (401, 403):
        sys.exit(f"error: the Ray job server at {address} refused this machine's token ({err.code}): set "
                 "RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the cluster's token, RAY_AUTH_MODE=token")
except Exception as err:
    sys.exit(f"error: no Ray job server at {address} ({err}); start a local cluster with "
             "launch/start_local_ray.sh, or set RAY_DASHBOARD_ADDRESS to your cluster's dashboard")
PY
exec ray job submit --address "$address" --working-dir . -- \
  python -m metadistil_scale.launch.ray_job \
  --num-workers "${RAY_NUM_WORKERS:-2}" --storage-path "${RAY_STORAGE_PATH:-$PWD/runs/ray}" --max-failures 3 \
  --deepspeed-teacher ds_configs/zero2.json --deepspeed-student ds_configs/zero2.json "$@"
