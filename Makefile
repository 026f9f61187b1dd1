# The two commands of the README. Each does its own set-up on a fresh machine.
.PHONY: setup demo test lint fresh-check

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

# What CI cannot check: a fresh clone, a clean HOME, Ray's temp dir not there yet.
fresh-check:
	bash scripts/fresh_check.sh
