#!/usr/bin/env bash
# An idle daemon A next to a daemon B saturated by load (14 requests/s on 2 cores): does A fence
# workers that were fine? A's failure count is printed last (0 expected). Not part of `make bench`:
# a check of the health monitor under a starved host, run by hand (docs/bench/ANALYSIS.md).
# CODE=DIR runs the kevlard package of another checkout (a git worktree), with this venv.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${CODE:-$REPO}"
PY="$REPO/.venv/bin/python"
LOG=${LOG:-/tmp/kevlard-neighbour-A.log}
$PY -m kevlard serve --port 8091 > "$LOG" 2>&1 &
A=$!
for i in $(seq 1 80); do curl -sf localhost:8091/ready >/dev/null && break; sleep 0.5; done
$PY -m kevlard bench --config "$REPO/docs/bench/emulated.toml" --rate 14 --requests 500 --output-tokens 32 --seed 3 2>/dev/null | grep "^| [a-zS]" | tail -1
curl -s localhost:8091/api/cluster | $PY -c 'import json,sys; d=json.load(sys.stdin); print("A recovery:", d["recovery"])'
kill -TERM $A; wait $A
grep -c "event failure" "$LOG"
