#!/usr/bin/env bash
# The check CI cannot make: the committed HEAD on a machine as a new user has it. A fresh
# clone in a new folder, Ray's temp dir pointed at a directory that does not exist yet, and a
# clean HOME (no ~/.ray, no pip or Ray caches); then CI's own script. Afterwards the clean
# HOME must not hold a Ray auth token (the suite must not change a user's home).
#
# Usage: bash scripts/fresh_check.sh [WORKDIR]   (default: a new temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-$(mktemp -d -t moeyard-fresh.XXXXXX)}
rm -rf "$root/clone" "$root/home" "$root/ray-new"
mkdir -p "$root/home"
git clone -q . "$root/clone"
echo "== fresh clone of $(git rev-parse --short HEAD) in $root/clone"
echo "   HOME=$root/home (empty), RAY_TMPDIR=$root/ray-new (does not exist)"
start=$(date +%s)
set +e
(cd "$root/clone" && env CI=true HOME="$root/home" RAY_TMPDIR="$root/ray-new" bash .ci/run) \
  2>&1 | tee "$root/ci.log"
rc=${PIPESTATUS[0]}
set -e
echo "== .ci/run exited $rc after $(($(date +%s) - start)) s"
grep -E '^[0-9]+ passed|passed|failed' "$root/ci.log" | tail -n 1
if [ -e "$root/home/.ray/auth_token" ]; then
  echo "the suite wrote ~/.ray/auth_token in the clean HOME" >&2
  rc=1
fi
exit "$rc"
