#!/usr/bin/env bash
# The test suite: lint, then every test. Services the tests use are started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -ra "$@"
