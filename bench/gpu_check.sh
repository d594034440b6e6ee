#!/usr/bin/env bash
# GPU check for a lent machine (one GPU, a bare Python with torch): rehost from pinned host memory
# vs disk, link throughput between two workers on one GPU, end-to-end MTTR on CUDA.
# Results (gpu_check.json, gpu_check.md, the daemon's log) go to $OUT, else bench/gpu-check-out/.
# Bounded by `timeout 450`; each part also has its own budget inside bench/gpu_check.py.
# Usage: bench/gpu_check.sh [gpu_check.py args, e.g. --stage-gb 2 --device cuda:0]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
OUT_DIR=${OUT:-bench/gpu-check-out}
mkdir -p "$OUT_DIR"

echo "== machine"
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
echo "host $(hostname) -> $(getent hosts "$(hostname)" || echo 'does not resolve (Gloo may need GLOO_SOCKET_IFNAME=lo)')"
df -h /dev/shm . | sed 's/^/  /'
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "| available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())'

echo "== bench/gpu_check.py"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 15 450 "$PY" bench/gpu_check.py --out "$OUT_DIR" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_check.py: killed after 450 s" >&2
exit "$rc"
