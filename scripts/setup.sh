#!/usr/bin/env bash
# Build .venv with a CPU torch and fl-audit (editable) plus its data and dev
# extras. Idempotent: a second run only checks. Safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch first and pinned: 2.13.0 is a local CPU wheel on these machines; a
# newer torch chosen by the resolver would be a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[data,simulation,dev]"

# Fashion-MNIST ships as a Debian package (IDX files); tests that need it are
# skipped with a reason when it cannot be installed.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null \
        && [ "$(id -u)" = 0 ]; then
    { apt-get install -y -qq dataset-fashion-mnist \
        || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; \
    } >/dev/null 2>&1 || echo "setup: dataset-fashion-mnist not installed (tests using it skip)"
fi
