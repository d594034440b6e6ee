"""PNG plots of benchmark runs: rolling TTFT and tokens/s over time, each fault marked.

The shape of the KevlarFlow paper's Figure 1: one line per run (mode), time since the run
started on x, a vertical line where each fault was injected. TTFT is placed at the time the
first token arrived, so a stall shows up where users saw it. The series are pure functions;
matplotlib is imported only to draw, on its Agg canvas (no display, no pyplot global state).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from kevlard.bench.loadgen import BenchResult
from kevlard.bench.report import RequestRecord

PLOT_WINDOW_S = 1.0
PLOT_STEP_S = 0.1


def _trailing(events: list[tuple[float, float]], stop_s: float, window_s: float,
              step_s: float) -> list[tuple[float, list[float]]]:
    """(t, values of the events in (t - window_s, t]) for t = step_s, 2 step_s, ... up to stop_s."""
    if not (window_s > 0 and step_s > 0):
        raise ValueError(f"window and step must be > 0 s, got {window_s}, {step_s}")
    events = sorted(events)
    out = []
    k = 1
    while (t := k * step_s) <= stop_s + step_s - 1e-9:
        out.append((t, [value for at, value in events if t - window_s < at <= t]))
        k += 1
    return out


def ttft_series(records: Iterable[RequestRecord], stop_s: float, window_s: float = PLOT_WINDOW_S,
                step_s: float = PLOT_STEP_S) -> list[tuple[float, float]]:
    """(t, mean TTFT of the requests whose first token arrived in the window_s before t), every
    step_s from the start to stop_s; times with no first token in their window are left out."""
    events = [(r.first_token_s, r.ttft_s) for r in records if r.first_token_s is not None and r.ttft_s is not None]
    return [(t, sum(values) / len(values)) for t, values in _trailing(events, stop_s, window_s, step_s) if values]


def tokens_per_s_series(records: Iterable[RequestRecord], stop_s: float, window_s: float = PLOT_WINDOW_S,
                        step_s: float = PLOT_STEP_S) -> list[tuple[float, float]]:
    """(t, output tokens/s over the window_s before t; over [0, t] while t < window_s), every step_s.

    Tokens as in report.summarize: successful requests only, each chunk weighted so that a
    request's chunks add up to its output_tokens."""
    events = []
    for r in records:
        chunks = sum(n for _, n in r.token_times)
        if not r.ok or chunks <= 0:
            continue
        scale = r.output_tokens / chunks if r.output_tokens > 0 else 1.0
        events += [(t, n * scale) for t, n in r.token_times]
    return [(t, sum(values) / min(window_s, t)) for t, values in _trailing(events, stop_s, window_s, step_s)]


def _end_s(records: Sequence[RequestRecord]) -> float:
    return max((r.finished_s for r in records), default=0.0)


def plot_runs(results: Sequence[BenchResult], path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG of rolling TTFT (top) and output tokens/s (bottom) of each run to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    ttft_axes, tps_axes = figure.subplots(2, 1, sharex=True)
    for number, result in enumerate(results):
        color = f"C{number % 10}"
        label = result.label or result.model
        end = _end_s(result.records)
        ttft = ttft_series(result.records, end)
        tps = tokens_per_s_series(result.records, end)
        ttft_axes.plot([t for t, _ in ttft], [v for _, v in ttft], color=color, label=label)
        tps_axes.plot([t for t, _ in tps], [v for _, v in tps], color=color, label=label)
        for fault in result.faults:
            if not fault.ok or fault.injected_s is None:
                continue
            for axes in (ttft_axes, tps_axes):
                axes.axvline(fault.injected_s, color=color, linestyle="--", linewidth=1)
            # labels of runs whose faults share a time are staggered down the axis
            ttft_axes.annotate(f"{fault.kind} ({label})", xy=(fault.injected_s, 1.0 - 0.2 * (number % 4)),
                               xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                               fontsize=8, color=color)
    ttft_axes.set_ylabel(f"TTFT s (mean, {PLOT_WINDOW_S:g} s window)")
    tps_axes.set_ylabel(f"output tokens/s ({PLOT_WINDOW_S:g} s window)")
    tps_axes.set_xlabel("time since the run started, s")
    ttft_axes.set_ylim(bottom=0)
    tps_axes.set_ylim(bottom=0)
    ttft_axes.legend(loc="upper right", fontsize=8)
    ttft_axes.set_title(title or "kevlard bench: rolling TTFT and throughput, faults marked")
    for axes in (ttft_axes, tps_axes):
        axes.grid(alpha=0.3)
    figure.savefig(os.fspath(path), format="png", dpi=100)
