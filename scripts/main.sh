#!/usr/bin/env bash
# The main job on the embedded default: fine-tune the MiniLM teacher, distil with KD and MetaDistil, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
exec .venv/bin/metadistil-scale train "$@"
