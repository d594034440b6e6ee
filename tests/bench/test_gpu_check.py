"""bench/gpu_check.py, the script a lent GPU machine runs once: proved end to end on CPU here,
so the one device run is not spent finding a typo."""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_run_measures_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--stage-gb", "0.05", "--out", str(out),
         "--scratch", str(tmp_path)],
        capture_output=True, text=True, timeout=150, check=False, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())

    rehost = result["rehost"]
    assert rehost["stage_bytes"] > 0.03e9
    for path in ("pinned", "disk"):
        assert rehost[path]["runs"] >= 1 and rehost[path]["median_s"] > 0
    assert rehost["disk_over_pinned"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gpu-check-")], "disk copy left behind"
    assert not [p for p in os.listdir("/dev/shm") if "gpucheck" in p], "store file left behind"

    sizes = result["link"]["sizes"]
    assert list(sizes) == ["64 KiB", "1 MiB", "16 MiB", "128 MiB"]
    assert all(s["median_s"] > 0 and s["gb_per_s"] > 0 for s in sizes.values())

    mttr = result["mttr"]  # this venv has the daemon's dependencies: part c must run
    assert "error" not in mttr and "skipped" not in mttr, mttr
    assert mttr["kill_to_first_token_s"] > 0 and mttr["restore_since_failure_s"] > 0
    assert all(s["error"] is None and s["tokens"] == s["max_tokens"] for s in mttr["inflight_streams"])
    assert (out / "mttr-daemon.log").stat().st_size > 0

    summary = (out / "gpu_check.md").read_text()
    assert "## a. Rehost" in summary and "| 128 MiB |" in summary and "kill -> first token" in summary
    assert summary.strip() in proc.stdout


def test_stage_layout_is_aligned_contiguous_and_about_the_size_asked():
    gpu_check = load_script()
    entries, total = gpu_check.stage_entries(int(4e9), torch.bfloat16)
    assert abs(total - 4e9) / 4e9 < 0.05
    assert all(e.offset % gpu_check.ALIGNMENT == 0 for e in entries)
    assert all(a.offset + a.nbytes <= b.offset for a, b in itertools.pairwise(entries))
    assert entries[-1].offset + entries[-1].nbytes <= total


def test_report_says_why_a_part_has_no_numbers():
    gpu_check = load_script()
    result = {"machine": {"torch": "x", "cuda": "12.8", "gpu": "H200"}, "args": {"device": "cuda:0"},
              "total_s": 1.0, "rehost": {"error": "MemoryError: no room"},
              "link": {"skipped": "not reached (the run was killed)"},
              "mttr": {"skipped": "daemon dependencies do not import: uvicorn"}}
    summary = gpu_check.markdown(result)
    assert "**Error:** MemoryError: no room" in summary
    assert "Skipped: not reached" in summary and "Skipped: daemon dependencies do not import: uvicorn" in summary
