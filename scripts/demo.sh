#!/usr/bin/env bash
# The demo: trains the tiny MoE on CPU with expert parallelism 2 over two gloo ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DEMO_OUT:-runs/demo}
rm -rf "$out"
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 -m trainer.train infra/runs/tiny.yaml \
  parallel.ep=2 run.output_dir="$out" "$@"
echo "metrics: $out/metrics.jsonl   placement: $out/placement.json   summary: $out/summary.json"
