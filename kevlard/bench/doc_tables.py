"""The pieces docs/BENCHMARKS.md is written with (kevlard.bench.document and its sections): a run's
JSON read back, numbers formatted, targets with their verdicts, the per-run table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _f(value: Any, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _summary(run: dict[str, Any] | None, key: str) -> Any:
    return ((run or {}).get("summary") or {}).get(key)


class Targets:
    """Rows of (target, measured, verdict, why-if-missed)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self._told: set[str] = set()

    def add(self, target: str, measured: str, ok: bool | None, why: str = "") -> None:
        if ok is False and why in self._told:
            why = "as above"
        elif ok is False:
            self._told.add(why)
        self.rows.append((target, measured, _verdict(ok), why if ok is False else ""))

    def markdown(self) -> list[str]:
        if not self.rows:
            return []
        lines = ["| target | measured | | why, where missed |", "|---|---|---|---|"]
        lines += [f"| {t} | {m} | {v} | {w} |" for t, m, v, w in self.rows]
        return lines + [""]


def _run_table(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| run | requests | failed | output tok/s | latency mean s | latency p99 s | TTFT mean s | TTFT p99 s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs:
        s = run.get("summary") or {}
        lines.append(f"| {name} | {s.get('requests')} | {s.get('failed')} | {_f(s.get('output_tokens_per_s'), '.1f')} "
                     f"| {_f(s.get('latency_mean_s'))} | {_f(s.get('latency_p99_s'))} | {_f(s.get('ttft_mean_s'), '.3f')} "
                     f"| {_f(s.get('ttft_p99_s'), '.3f')} |")
    return lines + [""]
