#!/usr/bin/env bash
# An interleaved A/B of one SIGKILL under load: an older commit (BASE, checked out as a git worktree)
# against the working tree, ROUNDS rounds (default 4), a fresh daemon each, the killed stage
# alternating 1, 0, 1, ...; prints, per run, the probe, the time back to 90 %, the run's TTFT and the
# restore's phases from the daemon's log. Each side runs from its own tree: `python -m` puts the
# working directory first on sys.path, so a worktree on PYTHONPATH alone would never be imported.
# Usage: bash bench/ab_kill.sh BASE [ROUNDS]       (results in $OUT, default /tmp/kevlard-ab)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HERE=$(pwd)
BASE=${1:?usage: bench/ab_kill.sh BASE_COMMIT [ROUNDS]}
ROUNDS=${2:-4}
OUT=${OUT:-/tmp/kevlard-ab}
PORT=${PORT:-8091}
mkdir -p "$OUT"
rm -rf "$OUT/base"
git worktree add -f --detach -q "$OUT/base" "$BASE"
trap 'git -C "$HERE" worktree remove --force "$OUT/base" >/dev/null 2>&1 || true' EXIT
PY=$HERE/.venv/bin/python
for round in $(seq 1 "$ROUNDS"); do
  stage=$(( round % 2 ))
  for side in base head; do
    if [[ $side == base ]]; then src=$OUT/base; else src=$HERE; fi
    printf '[server]\nadmin_token = "bench"\n' > "$OUT/$side.toml"
    (cd "$src" && PYTHONPATH=$src exec "$PY" -m kevlard serve --port "$PORT" --config "$OUT/$side.toml" \
        > "$OUT/$side-$round.log" 2>&1) &
    pid=$!
    for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null 2>&1 && break; sleep 0.2; done
    "$PY" -m kevlard bench --url "http://127.0.0.1:$PORT" --admin-token bench --warmup 4 --seed 1 --rate 3 \
        --requests 60 --output-tokens 32 --fault kill@8s --fault-stage "$stage" --json "$OUT/$side-$round.json" \
        > /dev/null 2>&1
    kill -TERM "$pid"; wait "$pid" || true
    "$PY" - "$OUT/$side-$round.json" "$OUT/$side-$round.log" "$side" "$round" "$stage" <<'PYEOF'
import json, re, sys
path, log, side, rnd, stage = sys.argv[1:]
d = json.load(open(path)); f = d["faults"][0]; s = d["summary"]
restore = [line for line in open(log) if "event restore" in line]
phases = dict(re.findall(r" (rehost_s|host_s|links_s|drain_s|handback_s)=([0-9.]+)", restore[0])) if restore else {}
print(side, rnd, "stage", stage, "probe", f["probe_first_token_s"], "back90", f["recovery_to_90pct_s"],
      "lost", f["lost_requests"], "ttft mean", round(s["ttft_mean_s"], 3), "p99", round(s["ttft_p99_s"], 3), phases)
PYEOF
  done
done
