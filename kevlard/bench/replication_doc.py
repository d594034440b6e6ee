"""The replication part of docs/BENCHMARKS.md: its overhead, on against off in alternating pairs of
failure-free runs, above and below the daemon's capacity (bench/fault_tolerance.sh)."""
from __future__ import annotations

import statistics
from pathlib import Path

from kevlard.bench.doc_tables import Targets, _f, _ratio, _run_table, _summary, load
from kevlard.bench.reasons import WHY
from kevlard.bench.report import percentile


def section_replication(bench: Path, t: Targets) -> list[str]:
    return _replication(replication_pairs(bench), replication_pairs(bench, "replication-low"), t)


def _replication(saturated: list[tuple[dict, dict]], below: list[tuple[dict, dict]], t: Targets) -> list[str]:
    """Throughput at a rate above the daemon's capacity (its output tokens/s is then the capacity),
    p99 latency at a rate below it: above, latency is the queue, and its p99 grows with the run's
    length, not with what a request costs. Each verdict is on all pairs' requests pooled per side
    (a p99 over one pass's requests is its slowest one or two); each pair's overhead and their
    median are listed beside it. Without pairs below capacity (older runs) p99 is judged above it."""
    out: list[str] = []
    rows = [("throughput", "output_tokens_per_s", saturated, True),
            ("p99 latency", "latency_p99_s", below or saturated, True)]
    if below:
        rows.append(("p99 latency", "latency_p99_s", saturated, False))
    for label, pairs in (("above capacity", saturated), ("below capacity", below)):
        if pairs:
            out += [f"Replication, failure-free, {label}: {_rate(pairs)} requests/s, {_summary(pairs[0][0], 'requests')}"
                    f" requests a run, {len(pairs)} alternating pair(s) of runs:", ""]
            out += _run_table([(f"replication {how} ({label}, {i})", run) for i, (on, off) in enumerate(pairs, 1)
                               for how, run in (("on", on), ("off", off))])
    for what, key, pairs, judged in rows:
        if not pairs:
            continue
        side = [list(runs) for runs in zip(*pairs)]  # the on runs, the off runs
        flip = key == "output_tokens_per_s"  # less throughput is the cost
        if flip:
            pooled = _ratio(_pooled_tps(side[1]), _pooled_tps(side[0]))
        else:
            p99 = [percentile([r["latency_s"] for run in runs for r in run.get("records") or [] if r.get("ok")], 99)
                   for runs in side]
            pooled = _ratio(p99[0], p99[1])
        pcts = [(r - 1) * 100 for r in (_ratio(_summary(off if flip else on, key), _summary(on if flip else off, key))
                                        for on, off in pairs) if r is not None]
        pct = None if pooled is None else (pooled - 1) * 100
        each = f" (median of the pairs {statistics.median(pcts):.1f} %; pairs: " \
               f"{', '.join(f'{x:.1f}' for x in pcts)} %)" if pcts else ""
        where = f" at {_rate(pairs)} requests/s"
        if judged:
            t.add(f"replication overhead in {what} <= 2 %{where}", _f(pct, ".1f", " %") + each,
                  None if pct is None else pct <= 2.0, WHY["replication"])
        else:
            t.add(f"replication overhead in {what}{where}, above capacity (the queue's growth; no target)",
                  _f(pct, ".1f", " %") + each, None)
    return out


def _rate(pairs: list[tuple[dict, dict]]) -> str:
    rate = (pairs[0][0].get("settings") or {}).get("rate")
    return "?" if rate is None else f"{rate:g}"


def _pooled_tps(runs: list[dict]) -> float | None:
    tokens = sum(_summary(run, "output_tokens") or 0 for run in runs)
    seconds = sum(_summary(run, "duration_s") or 0 for run in runs)
    return tokens / seconds if seconds else None


def replication_pairs(bench: Path, stem: str = "replication") -> list[tuple[dict, dict]]:
    """The (on, off) runs of the replication benchmark, in order; the single pair of older runs too."""
    pairs, i = [], 1
    while (bench / f"{stem}-on-{i}.json").exists() or (bench / f"{stem}-off-{i}.json").exists():
        on, off = load(bench / f"{stem}-on-{i}.json"), load(bench / f"{stem}-off-{i}.json")
        if on and off:
            pairs.append((on, off))
        i += 1
    if not pairs and stem == "replication":
        on, off = load(bench / "replication-on.json"), load(bench / "replication-off.json")
        if on and off:
            pairs.append((on, off))
    return pairs
