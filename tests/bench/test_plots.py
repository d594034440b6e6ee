"""kevlard bench --plot: the rolling series on hand-made records, and the PNG they make."""
from __future__ import annotations

import pytest

from kevlard.bench import BenchResult, FaultRecord, RequestRecord
from kevlard.bench.plots import plot_runs, tokens_per_s_series, ttft_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(index: int, sent: float, first: float | None, token_times=(), ok: bool = True) -> RequestRecord:
    times = tuple((t, 1) for t in token_times)
    return RequestRecord(index=index, prompt_index=0, scheduled_s=sent, sent_s=sent,
                         finished_s=max([sent, *(t for t, _ in times)]) + 0.01, first_token_s=first,
                         output_tokens=len(times), content_chunks=len(times), ok=ok, token_times=times)


def test_ttft_is_placed_at_the_first_token_and_averaged_over_the_trailing_window():
    records = [rec(0, 0.0, 0.2), rec(1, 0.1, 0.5), rec(2, 1.0, 3.0), rec(3, 2.0, None)]
    series = dict(ttft_series(records, stop_s=3.0, window_s=1.0, step_s=0.5))
    assert series[0.5] == pytest.approx((0.2 + 0.4) / 2)  # both first tokens in (-0.5, 0.5]
    assert series[1.0] == pytest.approx((0.2 + 0.4) / 2)  # (0, 1]: the same two
    assert 1.5 not in series and 2.0 not in series and 2.5 not in series  # no first token in the window
    assert series[3.0] == pytest.approx(2.0)  # a stalled request shows when its token came


def test_tokens_per_s_counts_successful_tokens_in_the_trailing_window():
    records = [rec(0, 0.0, 0.1, token_times=(0.1, 0.2, 0.3, 0.4)),
               rec(1, 0.0, 0.1, token_times=(0.15, 0.25), ok=False),  # failed: not counted
               rec(2, 1.0, 1.2, token_times=(1.2, 1.4))]
    series = dict(tokens_per_s_series(records, stop_s=2.5, window_s=1.0, step_s=0.5))
    assert series[0.5] == pytest.approx(4 / 0.5)  # the first half second: over what has elapsed
    assert series[1.0] == pytest.approx(4.0)
    assert series[1.5] == pytest.approx(2.0)  # (0.5, 1.5]: the two tokens of request 2
    assert series[2.0] == pytest.approx(2.0)
    assert series[2.5] == pytest.approx(0.0)  # a dip is a zero, not a gap


def test_plot_writes_a_png_with_a_line_per_run(tmp_path):
    def result(label: str, fault: bool) -> BenchResult:
        records = [rec(i, i * 0.3, i * 0.3 + 0.1, token_times=[i * 0.3 + 0.1 + j * 0.05 for j in range(8)])
                   for i in range(12)]
        faults = [FaultRecord(kind="kill", at_s=1.5, injected_s=1.5, ok=True)] if fault else []
        return BenchResult(url="u", model="m", label=label, started_at="t", settings={},
                           records=records, faults=faults)

    path = tmp_path / "plot.png"
    plot_runs([result("failure-free", False), result("kevlar", True)], path)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
