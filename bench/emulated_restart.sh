#!/usr/bin/env bash
# Issue 5's comparison with the restart baseline stretched to an 8B model's reload: `kevlard bench
# --compare kevlar,restart --restart-reload-s 60` (a failure-free pass, then kevlar, then the
# restart whose torn-down pipeline waits 60 s before reloading: "emulated" in every table and
# plot), SIGKILL of pipeline 0's stage-1 worker 8 s in: at 3 requests/s, and at 8 for 70 s with a
# 60 s window (the reload's length: a load one pipeline alone serves only by batching more). Daemons
# are started by the bench itself from the config below. Then the same at 3 requests/s with one
# pipeline (1 x 2 + 1 spare), as when one engine instance spans all the devices: nothing else can
# absorb the load while the baseline reloads; requests may wait 120 s for a route (default 30 s, then a
# retryable 503), so the baseline's requests wait out its reload. Results land in docs/bench/.
# `cpu_budget = "pipeline"` pins each pipeline's workers to their own core: on GPUs each pipeline
# is its own devices' capacity, and without it a torn-down pipeline's core simply goes to the other
# one, so the baseline would lose almost no capacity while it reloads.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=docs/bench
mkdir -p "$OUT"
K=.venv/bin/kevlard
printf '[server]\nadmin_token = "bench"\n[cluster]\ncpu_budget = "pipeline"\n' > "$OUT/emulated.toml"
COMMON=(--config "$OUT/emulated.toml" --compare kevlar,restart --fault kill@8s --restart-reload-s 60
        --output-tokens 32 --seed 1 --warmup 4)
$K bench "${COMMON[@]}" --rate 3 --requests 60 \
    --json "$OUT/compare-emulated-reload-rate3.json" --plot "$OUT/compare-emulated-reload-rate3.png" \
    > "$OUT/compare-emulated-reload-rate3.txt"
$K bench "${COMMON[@]}" --rate 8 --requests 560 --window-s 60 \
    --json "$OUT/compare-emulated-reload-rate8.json" --plot "$OUT/compare-emulated-reload-rate8.png" \
    > "$OUT/compare-emulated-reload-rate8.txt"
printf '[server]\nadmin_token = "bench"\n[cluster]\ndevices = "cpu:2"\npipelines = 1\nstages = 2\nspares = 1\n[scheduler]\nno_route_wait_s = 120\n' \
    > "$OUT/emulated-1pipeline.toml"
ONE=(--config "$OUT/emulated-1pipeline.toml" "${COMMON[@]:2}")
$K bench "${ONE[@]}" --rate 3 --requests 240 --window-s 60 \
    --json "$OUT/compare-emulated-reload-1pipeline-rate3.json" \
    --plot "$OUT/compare-emulated-reload-1pipeline-rate3.png" > "$OUT/compare-emulated-reload-1pipeline-rate3.txt"
