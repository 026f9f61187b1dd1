#!/usr/bin/env bash
# Creates .venv with moeyard and its test extras. torch==2.13.0 goes in first and stays
# pinned while the project installs, so the CPU build satisfies the project's torch range and
# no CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==2.13.0" >"$pin"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c "$pin" -e ".[test]"
