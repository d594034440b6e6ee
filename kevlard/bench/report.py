"""What a benchmark run measured: one record per request, the summary, and its Markdown table.

`summarize` is pure (records in, numbers out) so that later fault schedules and mode
comparisons can summarise any slice of a run (before, during, after a fault) the same way.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class RequestRecord:
    """One request of a run. Times are seconds since the run started (monotonic clock)."""

    index: int
    prompt_index: int
    scheduled_s: float  # when the Poisson schedule wanted it sent
    sent_s: float
    finished_s: float
    first_token_s: float | None  # first non-empty content delta; None if there was none
    output_tokens: int  # usage.completion_tokens when the server sent it, else content_chunks
    content_chunks: int  # non-empty content deltas received
    ok: bool
    status_code: int | None = None  # None when no HTTP answer came (connection error, timeout)
    error: str | None = None
    finish_reason: str | None = None

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.sent_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "latency_s": self.latency_s, "ttft_s": self.ttft_s}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: Iterable[RequestRecord]) -> dict[str, Any]:
    """Numbers for a set of requests.

    Duration runs from the first send to the last finish over all requests, failed ones included.
    Throughput, requests/s, latency and TTFT count successful requests only: tokens of a request
    that failed half-way are not service a user received.
    """
    records = list(records)
    succeeded = [r for r in records if r.ok]
    if records:
        duration_s = max(r.finished_s for r in records) - min(r.sent_s for r in records)
    else:
        duration_s = 0.0
    output_tokens = sum(r.output_tokens for r in succeeded)
    latencies = [r.latency_s for r in succeeded]
    ttfts = [t for t in (r.ttft_s for r in succeeded) if t is not None]
    return {
        "requests": len(records),
        "succeeded": len(succeeded),
        "failed": len(records) - len(succeeded),
        "duration_s": duration_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration_s if duration_s > 0 else None,
        "requests_per_s": len(succeeded) / duration_s if duration_s > 0 else None,
        "latency_mean_s": _mean(latencies),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_mean_s": _mean(ttfts),
        "ttft_p99_s": percentile(ttfts, 99),
    }


# (column title, summary key, format); one row per labelled summary, so a comparison of modes
# (kevlard against restart, against a peer) is the same table with more rows.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("requests", "requests", "d"),
    ("failed", "failed", "d"),
    ("duration s", "duration_s", ".2f"),
    ("output tok/s", "output_tokens_per_s", ".1f"),
    ("req/s", "requests_per_s", ".2f"),
    ("latency mean s", "latency_mean_s", ".3f"),
    ("latency p50 s", "latency_p50_s", ".3f"),
    ("latency p99 s", "latency_p99_s", ".3f"),
    ("TTFT mean s", "ttft_mean_s", ".3f"),
    ("TTFT p99 s", "ttft_p99_s", ".3f"),
)


def format_markdown(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A Markdown table with one row per (label, summary)."""
    header = ["run", *(title for title, _, _ in _COLUMNS)]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(_COLUMNS)) + "|"]
    for label, summary in rows:
        cells = [label or "-"]
        for _, key, fmt in _COLUMNS:
            value = summary.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
