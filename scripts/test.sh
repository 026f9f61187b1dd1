#!/usr/bin/env bash
# The test suite: lint, types (pyproject.toml's [tool.mypy]), then every test. Services the
# tests use are started by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy cluster trainer dataloader ops
.venv/bin/python -m pytest -q -ra --durations=25 "$@"
