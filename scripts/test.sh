#!/usr/bin/env bash
# The test suite, with all set-up. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
