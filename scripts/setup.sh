#!/usr/bin/env bash
# Creates .venv with moeyard and its test extras. torch==2.13.0 goes in first and stays
# pinned while the project installs, so the CPU build satisfies the project's torch range and
# no CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages the tests start: Prometheus (metrics tests) and headless Chromium (ops
# page test). Installed only when missing, and only where apt-get can run (root).
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
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
