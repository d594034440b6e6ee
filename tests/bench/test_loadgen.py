"""kevlard bench: the summary's arithmetic, the Poisson schedule, and run_load over real HTTP."""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kevlard.bench import (
    RequestRecord,
    format_markdown,
    percentile,
    poisson_schedule,
    run_load,
    summarize,
)
from kevlard.bench.loadgen import StderrProgress, chat_body
from kevlard.bench.prompts import PROMPTS
from kevlard.cli import main
from tests.live_server import serve_in_thread

DEADLINE_S = 20.0
MODEL_ID = "tiny-stream"


def record(index: int, sent: float, latency: float, ttft: float | None, tokens: int = 4,
           ok: bool = True) -> RequestRecord:
    return RequestRecord(index=index, prompt_index=index, scheduled_s=sent, sent_s=sent,
                         finished_s=sent + latency, first_token_s=None if ttft is None else sent + ttft,
                         output_tokens=tokens, content_chunks=tokens, ok=ok,
                         status_code=200 if ok else 500, error=None if ok else "HTTP 500: boom")


# --- summarize ------------------------------------------------------------------------------

def test_percentile_interpolates_linearly_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summarize_hand_made_records():
    records = [
        record(0, sent=0.0, latency=1.0, ttft=0.1),
        record(1, sent=0.5, latency=2.0, ttft=0.2),
        record(2, sent=1.0, latency=3.0, ttft=0.3),
        record(3, sent=1.5, latency=4.0, ttft=0.4),
        record(4, sent=2.0, latency=8.0, ttft=None, tokens=2, ok=False),  # the last to finish
    ]
    s = summarize(records)
    assert (s["requests"], s["succeeded"], s["failed"]) == (5, 4, 1)
    assert s["duration_s"] == pytest.approx(10.0)  # first send 0.0 -> last finish 10.0, failures included
    assert s["output_tokens"] == 16  # the failed request's tokens do not count
    assert s["output_tokens_per_s"] == pytest.approx(1.6)
    assert s["requests_per_s"] == pytest.approx(0.4)
    assert s["latency_mean_s"] == pytest.approx(2.5)
    assert s["latency_p50_s"] == pytest.approx(2.5)
    assert s["latency_p99_s"] == pytest.approx(3.97)
    assert s["ttft_mean_s"] == pytest.approx(0.25)
    assert s["ttft_p99_s"] == pytest.approx(0.397)


def test_summarize_with_nothing_succeeding_has_no_latencies():
    s = summarize([record(0, 0.0, 1.0, None, ok=False)])
    assert s["failed"] == 1 and s["output_tokens"] == 0
    assert s["latency_mean_s"] is None and s["ttft_p99_s"] is None
    assert summarize([])["requests"] == 0


def test_markdown_table_has_one_row_per_run():
    table = format_markdown([("a", summarize([record(0, 0.0, 1.0, 0.5)])),
                             ("b", summarize([record(0, 0.0, 1.0, None, ok=False)]))])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run |") and lines[2].startswith("| a |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


# --- schedule and request body --------------------------------------------------------------

def test_poisson_schedule_has_the_requested_mean_rate():
    rate, count = 8.0, 4000
    times = poisson_schedule(rate, count, seed=0)
    assert times[0] == 0.0 and times == sorted(times)
    # Mean gap 1/rate; the standard error of the mean of 4000 exponential gaps is ~1.6 %.
    assert (count - 1) / times[-1] == pytest.approx(rate, rel=0.06)
    assert poisson_schedule(rate, count, seed=0) == times
    assert poisson_schedule(rate, count, seed=1) != times
    assert poisson_schedule(float("inf"), 3, seed=0) == [0.0, 0.0, 0.0]


def test_chat_body_asks_for_exactly_n_tokens_unless_told_not_to():
    body = chat_body("m", "hello", 16, ignore_eos=True)
    assert body["max_tokens"] == body["min_tokens"] == 16 and body["ignore_eos"] is True
    assert body["stream"] is True and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert "ignore_eos" not in chat_body("m", "hello", 16, ignore_eos=False)


def test_prompt_set_is_varied():
    assert len(PROMPTS) >= 50 and len(set(PROMPTS)) == len(PROMPTS)
    lengths = sorted(len(p.split()) for p in PROMPTS)
    assert lengths[0] <= 3 and lengths[-1] >= 80


# --- run_load against a real HTTP server ----------------------------------------------------

def stream_server_app(*, send_usage: bool = True, fail_prompt: str | None = None,
                      log: list[tuple[str, float]] | None = None, extra_routes: list[Route] = ()) -> Starlette:
    """An OpenAI-shaped streaming server: max_tokens one-word deltas, 2 ms apart. Each chat
    request is appended to `log` as ("chat", perf_counter()) when it arrives."""

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})

    async def chat(request: Request) -> Response:
        body = await request.json()
        if log is not None:
            log.append(("chat", time.perf_counter()))
        if body.get("model") != MODEL_ID:
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        if body["messages"][0]["content"] == fail_prompt:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        n = body["max_tokens"]
        usage = send_usage and body.get("stream_options", {}).get("include_usage")

        async def events():
            head = {"id": "c", "object": "chat.completion.chunk", "model": MODEL_ID}
            yield "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
            for i in range(n):
                await asyncio.sleep(0.002)
                choice = {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}
                yield "data: " + json.dumps({**head, "choices": [choice]}) + "\n\n"
            yield "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}) + "\n\n"
            if usage:
                yield "data: " + json.dumps({**head, "choices": [], "usage": {
                    "prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"]),
                             *extra_routes])


@contextmanager
def live_server(app: Starlette) -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


@pytest.mark.parametrize("send_usage", [True, False], ids=["usage", "counted-deltas"])
async def test_run_load_measures_every_request(send_usage):
    progress: list[tuple[int, int, int]] = []
    with live_server(stream_server_app(send_usage=send_usage)) as url:
        async with asyncio.timeout(DEADLINE_S):
            result = await run_load(url, rate=200.0, requests=12, output_tokens=5, seed=3,
                                    label="t", progress=lambda *c: progress.append(c))
    assert result.model == MODEL_ID  # discovered from /v1/models
    assert [r.index for r in result.records] == list(range(12))
    for r in result.records:
        assert r.ok, r.error
        assert r.status_code == 200 and r.finish_reason == "length"
        assert r.output_tokens == r.content_chunks == 5
        assert r.scheduled_s <= r.sent_s and 0 <= r.ttft_s <= r.latency_s
    summary = result.summary
    assert summary["failed"] == 0 and summary["output_tokens"] == 60
    assert summary["ttft_mean_s"] <= summary["latency_mean_s"]
    assert summary["latency_p50_s"] <= summary["latency_p99_s"]
    assert progress[-1] == (12, 12, 0)
    assert [c[0] for c in progress] == sorted(c[0] for c in progress)


async def test_run_load_records_failures_without_stopping():
    with live_server(stream_server_app(fail_prompt=PROMPTS[1])) as url:
        async with asyncio.timeout(DEADLINE_S):
            result = await run_load(url, rate=float("inf"), requests=4, output_tokens=3, seed=0,
                                    model=MODEL_ID)
    failed = [r for r in result.records if not r.ok]
    assert [r.index for r in failed] == [1]
    assert failed[0].status_code == 500 and "boom" in failed[0].error
    assert result.summary["failed"] == 1 and result.summary["output_tokens"] == 9


async def test_run_load_against_nothing_fails_every_request():
    # Port 9 (discard) on loopback: nothing listens there in the test environment.
    async with asyncio.timeout(DEADLINE_S):
        result = await run_load("http://127.0.0.1:9", rate=float("inf"), requests=2, output_tokens=3,
                                seed=0, model="m", timeout_s=5)
    assert [r.ok for r in result.records] == [False, False]
    assert all(r.status_code is None and "Connect" in r.error for r in result.records)


def test_cli_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    with live_server(stream_server_app()) as url:
        code = main(["bench", "--url", url, "--rate", "100", "--requests", "6", "--output-tokens", "4",
                     "--json", str(out), "--label", "tiny", "--timeout-s", str(DEADLINE_S)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| tiny | 6 | 0 |" in captured.out
    assert "bench: 6/6 done, 6 sent, 0 failed" in captured.err  # not a tty: a line at the end
    data = json.loads(out.read_text())
    assert data["label"] == "tiny" and data["model"] == MODEL_ID
    assert data["settings"]["output_tokens"] == 4 and data["settings"]["ignore_eos"] is True
    assert data["summary"]["output_tokens"] == 24 and len(data["records"]) == 6
    assert all(r["ttft_s"] <= r["latency_s"] for r in data["records"])


def test_cli_bench_rejects_bad_settings(capsys):
    assert main(["bench", "--url", "http://127.0.0.1:9", "--rate", "0"]) == 2
    assert "rate must be > 0" in capsys.readouterr().err


def test_progress_on_a_pipe_writes_a_line_every_ten():
    class Pipe:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return False

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    pipe = Pipe()
    progress = StderrProgress(25, stream=pipe)
    for done in range(26):
        progress(25, done, 0)
    progress.close()
    assert pipe.text.splitlines() == [f"bench: {n}/25 done, 25 sent, 0 failed" for n in (10, 20, 25)]
