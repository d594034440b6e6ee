"""What a benchmark run measured: one record per request, the summary, and its Markdown table.

`summarize` is pure (records in, numbers out) so that fault schedules and mode comparisons can
summarise any slice of a run (before, during, after a fault) the same way. `fault_metrics` is
pure too: the recovery numbers of a fault come from the request records (their send, first
token, finish and per-chunk arrival times) and the time the fault was injected, nothing else.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

# Throughput over time: output tokens/s in windows of THROUGHPUT_WINDOW_S stepped by
# THROUGHPUT_STEP_S. The pre-fault level is the mean over at most PRE_FAULT_S before the fault.
THROUGHPUT_WINDOW_S = 1.0
THROUGHPUT_STEP_S = 0.1
PRE_FAULT_S = 3.0
RECOVERY_FRACTION = 0.9
FAILURE_WINDOW_S = 5.0


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
    # (arrival time, chunks) of every non-empty content delta, in order; one chunk each
    token_times: tuple[tuple[float, int], ...] = ()
    text: str = ""  # the streamed answer, to compare greedy answers between runs

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.sent_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["token_times"] = [list(pair) for pair in self.token_times]
        return {**data, "latency_s": self.latency_s, "ttft_s": self.ttft_s}


@dataclass(frozen=True)
class FaultRecord:
    """One fault of a run's schedule and what became of its injection (times as in RequestRecord)."""

    kind: str
    at_s: float  # when the schedule wanted it
    worker: int | None = None  # the worker it was posted for (given, or picked from /api/cluster)
    stage: int | None = None  # the stage of pipeline 0 the worker was picked from; None if given
    duration_s: float | None = None
    injected_s: float | None = None  # just before POST /api/faults was sent; None if it never was
    acked_s: float | None = None  # when the answer came
    ok: bool = False  # the server accepted it
    status_code: int | None = None
    error: str | None = None
    # a request sent the moment the fault was accepted: fault injected -> its first token
    probe_first_token_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def _token_arrivals(records: Iterable[RequestRecord]) -> tuple[list[float], list[float]]:
    """(sorted arrival times, cumulative tokens up to and including each) over successful requests.

    A chunk weighs output_tokens / chunks of its request, so that a server that puts several
    tokens in one delta (held back for a stop string, an incomplete character) still counts them.
    Failed requests count nothing, as in `summarize`.
    """
    arrivals: list[tuple[float, float]] = []
    for r in records:
        if not r.ok or not r.token_times:
            continue
        chunks = sum(n for _, n in r.token_times)
        scale = r.output_tokens / chunks if chunks > 0 and r.output_tokens > 0 else 1.0
        arrivals += [(t, n * scale) for t, n in r.token_times]
    arrivals.sort()
    times, cumulative, total = [], [], 0.0
    for t, tokens in arrivals:
        total += tokens
        times.append(t)
        cumulative.append(total)
    return times, cumulative


def _tokens_in(times: list[float], cumulative: list[float], start: float, stop: float) -> float:
    """Tokens that arrived in [start, stop)."""
    lo, hi = bisect.bisect_left(times, start), bisect.bisect_left(times, stop)
    if hi <= lo:
        return 0.0
    return cumulative[hi - 1] - (cumulative[lo - 1] if lo else 0.0)


def throughput_series(records: Iterable[RequestRecord], start_s: float, stop_s: float,
                      window_s: float = THROUGHPUT_WINDOW_S,
                      step_s: float = THROUGHPUT_STEP_S) -> list[tuple[float, float]]:
    """(window start, output tokens/s in [start, start + window_s)) for windows starting at
    start_s, start_s + step_s, ... that end by stop_s."""
    if not (window_s > 0 and step_s > 0):
        raise ValueError(f"window and step must be > 0 s, got {window_s}, {step_s}")
    times, cumulative = _token_arrivals(records)
    series = []
    k = 0
    while (begin := start_s + k * step_s) + window_s <= stop_s + 1e-9:
        series.append((begin, _tokens_in(times, cumulative, begin, begin + window_s) / window_s))
        k += 1
    return series


def recovery_time(records: Sequence[RequestRecord], fault_s: float, *,
                  fraction: float = RECOVERY_FRACTION, window_s: float = THROUGHPUT_WINDOW_S,
                  step_s: float = THROUGHPUT_STEP_S,
                  pre_fault_s: float = PRE_FAULT_S) -> tuple[float | None, float | None]:
    """(pre-fault tokens/s, seconds from the fault until throughput is back to `fraction` of it).

    The pre-fault level is the mean output throughput over the min(fault_s, pre_fault_s)
    seconds before the fault. Recovery is the start of the first window of `window_s` (stepped
    by `step_s`) that begins at or after the fault and delivers at least `fraction` of that
    level, minus the fault time: only windows wholly after the fault count, so tokens that
    arrived before it cannot hide a dip, and a fault with no dip at all recovers in 0 s. None
    when there is no pre-fault level (a fault at the start, nothing served before it) or
    throughput never gets back before the run ends (its last finish).
    """
    records = list(records)
    span = min(fault_s, pre_fault_s)
    if span <= 0 or not records:
        return None, None
    times, cumulative = _token_arrivals(records)
    pre_level = _tokens_in(times, cumulative, fault_s - span, fault_s) / span
    if pre_level <= 0:
        return None, None
    end_s = max(r.finished_s for r in records)
    for begin, level in throughput_series(records, fault_s, end_s, window_s, step_s):
        if level >= fraction * pre_level - 1e-9:
            return pre_level, begin - fault_s
    return pre_level, None


def first_token_after(records: Iterable[RequestRecord], fault_s: float) -> float | None:
    """The earliest first-token time among requests sent at or after fault_s, minus fault_s
    (failed requests included: a first token is a first token); None if none got one."""
    firsts = [r.first_token_s for r in records if r.sent_s >= fault_s and r.first_token_s is not None]
    return min(firsts) - fault_s if firsts else None


def failure_window(records: Iterable[RequestRecord], fault_s: float,
                   window_s: float = FAILURE_WINDOW_S) -> list[RequestRecord]:
    """Requests in flight at fault_s (sent at or before it, finished after it) or sent within
    window_s after it."""
    return [r for r in records
            if (r.sent_s <= fault_s < r.finished_s) or (fault_s <= r.sent_s <= fault_s + window_s)]


_WINDOW_KEYS = ("requests", "succeeded", "failed", "latency_mean_s", "latency_p99_s",
                "ttft_mean_s", "ttft_p99_s")


def fault_metrics(records: Sequence[RequestRecord], faults: Iterable[FaultRecord],
                  window_s: float = FAILURE_WINDOW_S) -> list[dict[str, Any]]:
    """One dict per fault: its record, and where it was injected, its recovery numbers.

    first_token_after_fault_s, recovery_to_90pct_s and pre_fault_tokens_per_s as in
    `first_token_after` and `recovery_time`; `window` summarises the failure window (requests
    in flight at the fault or sent within window_s after it) with the keys of `summarize`;
    lost_requests are the failed requests of that window. Metrics are None for a fault that
    was not injected.
    """
    records = list(records)
    out = []
    for fault in faults:
        entry: dict[str, Any] = {**fault.to_json(), "window_s": window_s,
                                 "first_token_after_fault_s": None, "pre_fault_tokens_per_s": None,
                                 "recovery_to_90pct_s": None, "window": None,
                                 "lost_requests": None, "lost_request_indices": None}
        if fault.ok and fault.injected_s is not None:
            t = fault.injected_s
            pre_level, recovery = recovery_time(records, t)
            in_window = failure_window(records, t, window_s)
            summary = summarize(in_window)
            lost = [r.index for r in in_window if not r.ok]
            entry.update(first_token_after_fault_s=first_token_after(records, t),
                         pre_fault_tokens_per_s=pre_level, recovery_to_90pct_s=recovery,
                         window={key: summary[key] for key in _WINDOW_KEYS},
                         lost_requests=len(lost), lost_request_indices=lost)
        out.append(entry)
    return out


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


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_FAULT_HEADER = ("run", "fault", "worker", "injected s", "probe first token s", "first token after s",
                 "recovery to 90% s",
                 "pre-fault tok/s", "window reqs", "lost", "latency mean s window/all",
                 "latency p99 s window/all", "TTFT mean s window/all", "TTFT p99 s window/all",
                 "resumed / replayed", "recomputed tok per resumed")


def format_fault_markdown(rows: Sequence[tuple]) -> str:
    """A Markdown table with one row per fault of each (label, run summary, fault_metrics[,
    recovery counters over the run]); failure-window latencies beside the whole run's; the
    requests resumed from a replica or replayed, and the tokens recomputed per resumed request,
    are the run's (kevlard's counters; "-" for a server without them). Empty when no run had a
    fault."""
    lines = ["| " + " | ".join(_FAULT_HEADER) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(_FAULT_HEADER) - 2)) + "|"]
    count = 0
    for label, summary, faults, *more in rows:
        recovery = (more[0] if more else None) or {}
        resumed = recovery.get("requests_resumed_replica")
        replayed = recovery.get("requests_replayed")
        counts = "-" if resumed is None else f"{resumed} / {replayed}"
        for fault in faults:
            count += 1
            name = f"{fault['kind']}@{fault['at_s']:g}s"
            if not fault.get("ok"):
                name += " (not injected)"
            window = fault.get("window") or {}
            pair = [f"{_fmt(window.get(key), '.3f')} / {_fmt(summary.get(key), '.3f')}"
                    for key in ("latency_mean_s", "latency_p99_s", "ttft_mean_s", "ttft_p99_s")]
            cells = [label or "-", name, _fmt(fault.get("worker"), ""), _fmt(fault.get("injected_s"), ".2f"),
                     _fmt(fault.get("probe_first_token_s"), ".3f"),
                     _fmt(fault.get("first_token_after_fault_s"), ".3f"),
                     _fmt(fault.get("recovery_to_90pct_s"), ".2f"),
                     _fmt(fault.get("pre_fault_tokens_per_s"), ".1f"),
                     _fmt(window.get("requests"), "d"), _fmt(fault.get("lost_requests"), "d"),
                     *pair, counts, _fmt(recovery.get("tokens_recomputed_per_resumed_request"), ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if count else ""


def identical_share(records: Sequence[RequestRecord], reference: Sequence[RequestRecord]) -> float | None:
    """Share of the requests answered exactly as in `reference` (the same workload without
    faults), matched by request index; failed requests count as not identical."""
    ref = {r.index: r.text for r in reference if r.ok}
    pairs = [(r, ref[r.index]) for r in records if r.index in ref]
    if not pairs:
        return None
    return sum(1 for r, text in pairs if r.ok and r.text == text) / len(pairs)
