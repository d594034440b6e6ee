"""Runs of one workload against daemons the benchmark starts itself, one config field apart.

`--compare kevlar,restart`: a failure-free pass (the reference for identical answers), then the
same load and fault schedule once per recovery mode, each on a fresh daemon. `--replication
on,off`: the same load with `[kv] replication` on and off, and the overhead of on against off.
A plain `--config` run is the one-variant case. Each run gets its own daemon so that no mode
inherits another's spent spares, warm caches or half-finished recovery.
"""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kevlard.bench.loadgen import BenchResult, run_load
from kevlard.bench.managed_daemon import READY_TIMEOUT_S, ManagedDaemon
from kevlard.bench.report import identical_share

RECOVERY_MODES = ("kevlar", "restart")
REFERENCE_LABEL = "failure-free"


@dataclass(frozen=True)
class Variant:
    """One run: its label, the config fields it changes, and whether the fault schedule applies."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    with_faults: bool = True


def parse_modes(text: str) -> list[str]:
    """`kevlar,restart` -> ["kevlar", "restart"]; ValueError for an unknown or repeated mode."""
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes:
        raise ValueError(f"--compare: expected recovery modes like kevlar,restart, got {text!r}")
    for mode in modes:
        if mode not in RECOVERY_MODES:
            raise ValueError(f"--compare: mode must be one of {', '.join(RECOVERY_MODES)}, got {mode!r}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"--compare: a mode is given twice in {text!r}")
    return modes


def parse_on_off(text: str) -> list[bool]:
    """`on,off` -> [True, False]; ValueError for anything but on/off, or one given twice."""
    words = {"on": True, "off": False}
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(value not in words for value in values):
        raise ValueError(f"--replication: expected on, off or on,off, got {text!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"--replication: a value is given twice in {text!r}")
    return [words[value] for value in values]


def compare_variants(modes: Sequence[str], restart_reload_s: float = 0.0) -> list[Variant]:
    """The failure-free reference pass, then one faulted run per recovery mode. With
    `restart_reload_s`, the restart baseline's reload is stretched by that much (an emulated
    bigger model), and its label says so."""
    def variant(mode: str) -> Variant:
        if mode == "restart" and restart_reload_s > 0:
            return Variant(f"restart (+{restart_reload_s:g} s reload, emulated)",
                           {"recovery": mode, "cluster.restart_reload_extra_s": restart_reload_s})
        return Variant(mode, {"recovery": mode})
    return [Variant(REFERENCE_LABEL, {}, with_faults=False), *(variant(mode) for mode in modes)]


def replication_variants(values: Sequence[bool]) -> list[Variant]:
    return [Variant(f"replication {'on' if value else 'off'}", {"kv.replication": value}) for value in values]


def run_variants(config_path: str, variants: Sequence[Variant], work_dir: Path, *,
                 serve_args: Sequence[str] = (), faults: Sequence[Any] = (),
                 ready_timeout_s: float = READY_TIMEOUT_S,
                 progress_factory: Callable[[], Any] | None = None,
                 **load: Any) -> list[BenchResult]:
    """Start a daemon per variant (config + its overrides), run the load against it, stop it.

    `load` holds run_load's keyword arguments (rate, requests, output_tokens, seed, ...); the
    daemon's admin token, api key and url come from the managed daemon unless `load` sets an
    api_key. A BenchError (a daemon that never got ready) stops the whole comparison.
    """
    api_key = load.pop("api_key", None)
    results = []
    for number, variant in enumerate(variants):
        daemon = ManagedDaemon(config_path, work_dir, f"{number}-{_slug(variant.label)}",
                               overrides=variant.overrides, serve_args=serve_args,
                               ready_timeout_s=ready_timeout_s)
        print(f"bench: {variant.label}: starting kevlard serve ({daemon.log_path})", file=sys.stderr)
        progress = progress_factory() if progress_factory else None
        with daemon:
            try:
                result = asyncio.run(run_load(
                    daemon.url, **load, api_key=api_key or daemon.api_key, label=variant.label,
                    faults=faults if variant.with_faults else (), admin_token=daemon.admin_token,
                    progress=progress))
            finally:
                if progress is not None:
                    progress.close()
        if daemon.proc is not None and daemon.proc.returncode != 0:
            print(f"bench: {variant.label}: kevlard serve exited with {daemon.proc.returncode} "
                  f"(log {daemon.log_path})", file=sys.stderr)
        result.settings["overrides"] = dict(variant.overrides)
        results.append(result)
    return results


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-") or "run"


def replication_overhead(on: dict[str, Any], off: dict[str, Any]) -> dict[str, float | None]:
    """What replication costs, in % of the run without it (summaries as `summarize` makes them):
    throughput lost ((off - on) / off) and p99 latency added ((on - off) / off). Positive is a
    cost; None where a summary lacks the number."""
    def pct(cost: float | None, base: float | None) -> float | None:
        return None if cost is None or not base else cost / base * 100.0

    tps_on, tps_off = on.get("output_tokens_per_s"), off.get("output_tokens_per_s")
    p99_on, p99_off = on.get("latency_p99_s"), off.get("latency_p99_s")
    return {
        "throughput_pct": pct(None if tps_on is None or tps_off is None else tps_off - tps_on, tps_off),
        "latency_p99_pct": pct(None if p99_on is None or p99_off is None else p99_on - p99_off, p99_off),
    }


def format_overhead(overhead: dict[str, float | None]) -> str:
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1f} %"

    return (f"replication overhead (on vs off): throughput {show(overhead['throughput_pct'])}, "
            f"p99 latency {show(overhead['latency_p99_pct'])} (positive: replication costs)")


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_HEADER = ("run", "recovery", "faults", "requests", "lost", "identical answers", "output tok/s",
           "probe first token s", "recovery to 90% s", "TTFT mean s window/all",
           "latency p99 s window/all")


def format_comparison_markdown(results: Sequence[BenchResult],
                               shares: Sequence[float | None]) -> str:
    """One row per run; the fault columns are those of the run's first injected fault, the
    identical share that against the reference (None: it is the reference, or there is none)."""
    lines = ["| " + " | ".join(_HEADER) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(_HEADER) - 3)) + "|"]
    for result, share in zip(results, shares):
        summary = result.summary
        metrics = result.fault_metrics
        first = _first_fault(result)
        window = first.get("window") or {}
        recovery = result.settings.get("overrides", {}).get("recovery", "-")
        faults = ", ".join(f"{m['kind']}@{m['at_s']:g}s" + ("" if m.get("ok") else " (not injected)")
                           for m in metrics) or "-"
        if share is None:
            identical = "(reference)" if result.label == REFERENCE_LABEL else "-"
        else:
            identical = f"{share * 100:.0f} %"
        cells = [result.label or "-", recovery, faults, str(summary["requests"]), str(summary["failed"]),
                 identical, _fmt(summary["output_tokens_per_s"], ".1f"),
                 _fmt(first.get("probe_first_token_s"), ".3f"), _fmt(first.get("recovery_to_90pct_s"), ".2f"),
                 f"{_fmt(window.get('ttft_mean_s'), '.3f')} / {_fmt(summary['ttft_mean_s'], '.3f')}",
                 f"{_fmt(window.get('latency_p99_s'), '.3f')} / {_fmt(summary['latency_p99_s'], '.3f')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _first_fault(result: BenchResult) -> dict[str, Any]:
    """The metrics of the run's first fault that was injected ({} when none was)."""
    return next((m for m in result.fault_metrics if m.get("ok")), {})


_RATIO_KEYS = (("probe first token", "probe_first_token_s", None),
               ("latency mean (window)", "latency_mean_s", "window"),
               ("latency p99 (window)", "latency_p99_s", "window"),
               ("TTFT mean (window)", "ttft_mean_s", "window"),
               ("TTFT p99 (window)", "ttft_p99_s", "window"))


def headline_ratios(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """For each faulted run other than kevlar's: how many times longer than kevlar's each
    figure of its first injected fault is (restart / kevlar; None where a side has no value)."""
    kevlar = next((r for r in results if r.settings.get("overrides", {}).get("recovery") == "kevlar"), None)
    if kevlar is None:
        return []
    base = _first_fault(kevlar)
    rows = []
    for result in results:
        if result is kevlar or result.label == REFERENCE_LABEL:
            continue
        other = _first_fault(result)
        ratios = {}
        for name, key, section in _RATIO_KEYS:
            a = (base.get(section) or {}).get(key) if section else base.get(key)
            b = (other.get(section) or {}).get(key) if section else other.get(key)
            ratios[name] = b / a if a and b is not None else None
        rows.append({"run": result.label, "against": kevlar.label, "ratios": ratios})
    return rows


def format_ratios_markdown(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    names = [name for name, _, _ in _RATIO_KEYS]
    lines = ["| run / kevlar | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        cells = [f"{row['run']} / {row['against']}"] + [
            "-" if row["ratios"][n] is None else f"{row['ratios'][n]:.1f}x" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_shares(results: Sequence[BenchResult]) -> list[float | None]:
    """Each run's share of answers identical to the failure-free pass (the reference's own: None)."""
    reference = next((r for r in results if r.label == REFERENCE_LABEL), None)
    if reference is None:
        return [None] * len(results)
    return [None if r is reference else identical_share(r.records, reference.records) for r in results]
