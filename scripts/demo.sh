#!/usr/bin/env bash
# The demo: the whole system on one machine. A local Ray head (`ray start --head` on
# 127.0.0.1, fixed dashboard and metrics-export ports), a local S3 endpoint, a dataset
# prepared onto it, and the tiny MoE trained with expert parallelism 2 over two CPU workers,
# submitted with `ray job submit` (through `moeyard submit`) and followed to the end. Stops
# everything it started when it exits.
#
# Ports: DEMO_GCS_PORT (6379), DEMO_DASHBOARD_PORT (8265), DEMO_METRICS_PORT (8080).
# Extra arguments are overrides for the run, e.g. `bash scripts/demo.sh train.steps=20`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1
gcs_port=${DEMO_GCS_PORT:-6379}
dash_port=${DEMO_DASHBOARD_PORT:-8265}
metrics_port=${DEMO_METRICS_PORT:-8080}
address="http://127.0.0.1:$dash_port"
bucket=moeyard-demo
out=${DEMO_OUT:-runs/demo}
work=$(mktemp -d -t moeyard-demo.XXXXXX)
ray_pid="" s3_pid=""

cleanup() {
  # Only what this script started: the head's process group, then the S3 endpoint.
  if [ -n "$ray_pid" ]; then
    kill -TERM -- "-$ray_pid" 2>/dev/null || true
    sleep 3
    kill -KILL -- "-$ray_pid" 2>/dev/null || true
  fi
  if [ -n "$s3_pid" ]; then
    kill "$s3_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== S3 endpoint (moto) on 127.0.0.1"
python scripts/s3_endpoint.py --bucket "$bucket" --ready-file "$work/s3.url" >/dev/null &
s3_pid=$!
for _ in $(seq 300); do
  [ -s "$work/s3.url" ] && break
  kill -0 "$s3_pid" 2>/dev/null || { echo "the S3 endpoint did not start" >&2; exit 1; }
  sleep 0.2
done
export AWS_ENDPOINT_URL
AWS_ENDPOINT_URL=$(cat "$work/s3.url")
# A local endpoint takes any credentials; these are placeholders, not secrets.
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo-secret AWS_DEFAULT_REGION=us-east-1
echo "   $AWS_ENDPOINT_URL, bucket s3://$bucket"

echo "== Ray head on 127.0.0.1 (dashboard :$dash_port, metrics :$metrics_port)"
# Started with the S3 settings in its environment, as a real node holds its credentials
# (the environment `ray start` is run with, an instance profile, a Kubernetes secret): the
# job's driver and workers inherit them. `moeyard submit` never passes a key to the job, as
# Ray logs a job's runtime-env variables. Its own session (setsid) so that the trap can
# stop exactly its processes.
# The head's other ports (its agents, the client server) are free ones, so that another
# Ray on this machine does not stop the demo's.
read -r p1 p2 p3 p4 < <(python -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
setsid ray start --head --block --disable-usage-stats --node-ip-address=127.0.0.1 \
  --port="$gcs_port" --num-cpus=2 --object-store-memory=200000000 \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash_port" \
  --metrics-export-port="$metrics_port" --dashboard-agent-listen-port="$p1" \
  --dashboard-agent-grpc-port="$p2" --runtime-env-agent-port="$p3" \
  --ray-client-server-port="$p4" --temp-dir="$work/ray" >"$work/ray.log" 2>&1 &
ray_pid=$!
disown "$ray_pid"  # its end, by the trap, is expected: no "Killed" notice

echo "== dataset: a slice of the Python standard library, prepared onto s3://$bucket/data"
stdlib=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
moeyard prepare "$stdlib/email" "$stdlib/json" --out "s3://$bucket/data/stdlib" --seq-len 64 --quiet

echo "== waiting for the Ray job server"
for _ in $(seq 240); do
  python - "$address" 2>/dev/null <<'EOF' && break
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=2)
except urllib.error.HTTPError:
    pass  # it answers (a 401 when the cluster uses token auth)
EOF
  kill -0 "$ray_pid" 2>/dev/null || { cat "$work/ray.log" >&2; exit 1; }
  sleep 0.5
done

job=moeyard-demo-$(date -u +%Y%m%d-%H%M%S)
run="s3://$bucket/runs/demo"
echo "== ray job submit: tiny MoE, EP=2 over two CPU workers (job $job)"
moeyard submit infra/runs/tiny.yaml parallel.ep=2 cluster.num_workers=2 \
  data.source=shards "data.path=s3://$bucket/data/stdlib" "run.output_dir=$run" \
  checkpoint.every=25 "$@" --address "$address" --submission-id "$job" --wait

echo "== moeyard status $job"
moeyard status "$job" --address "$address"

# The endpoint keeps objects in memory: copy the run out before the trap stops it.
rm -rf "$out"
python - "$run" "$out" <<'EOF'
import json, sys
import s3fs
src, dst = sys.argv[1], sys.argv[2]
fs = s3fs.S3FileSystem()
fs.get(src.removeprefix("s3://") + "/", dst + "/", recursive=True)
s = json.load(open(f"{dst}/summary.json"))
print(f"== summary: {s['steps']} steps, final loss {s['final_loss']:.4f}, "
      f"{s['tokens_per_s']:.0f} tokens/s over {s['world_size']} workers (ep {s['ep']})")
print(f"   metrics:     {dst}/metrics.jsonl")
print(f"   checkpoints: {dst}/checkpoints/")
print(f"   placement:   {dst}/placement.json   summary: {dst}/summary.json")
print(f"   (written by the job to {src}, copied here before the local endpoint stops)")
EOF

echo "== moeyard report $out"
moeyard report "$out"
echo "== what to look at next"
echo "   the report:   $out/report/ (report.json and the PNG plots of the run)"
echo "   the ops page: moeyard dashboard serve $out   then open http://127.0.0.1:8765/"
echo "   to transformers: moeyard export $out --format hf --out $out-hf   (a MixtralForCausalLM;"
echo "                 AutoModelForCausalLM.from_pretrained(\"$out-hf\") loads it)"
