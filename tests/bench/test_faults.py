"""kevlard bench faults: --fault parsing, the recovery metrics on hand-made records, and
faults posted to a fake daemon while the load runs."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kevlard.bench import (FaultRecord, FaultSpec, RequestRecord, fault_metrics, format_fault_markdown,
                           parse_fault_spec, run_load, summarize)
from kevlard.bench.faults import parse_time_s
from kevlard.bench.report import failure_window, first_token_after, recovery_time, throughput_series
from kevlard.cli import main
from tests.bench.test_loadgen import DEADLINE_S, MODEL_ID, live_server, stream_server_app

TOKEN = "s3cret-admin"


# --- --fault parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("kill@5s", FaultSpec("kill", 5.0)),
    ("kill@5", FaultSpec("kill", 5.0)),
    ("hang@500ms", FaultSpec("hang", 0.5)),
    ("slow@1.5s", FaultSpec("slow", 1.5)),
    ("device_error@0", FaultSpec("device_error", 0.0)),
    ("hang@8s:worker=3", FaultSpec("hang", 8.0, worker=3)),
    ("slow@2s:worker=0:duration=750ms", FaultSpec("slow", 2.0, worker=0, duration_s=0.75)),
    ("hang@.5s:duration=2", FaultSpec("hang", 0.5, duration_s=2.0)),
    ("kill@8s:pidfile=/run/peer.pid", FaultSpec("kill", 8.0, pidfile="/run/peer.pid")),
])
def test_parse_fault_spec_accepts(text, spec):
    assert parse_fault_spec(text) == spec
    assert parse_fault_spec(str(spec)) == spec  # str() is a spec again


@pytest.mark.parametrize("text, message", [
    ("kill", "KIND@TIME"),
    ("explode@5s", "kind must be one of"),
    ("kill@", "bad time"),
    ("kill@-1s", "bad time"),
    ("kill@5m", "bad time"),
    ("kill@5 s", "bad time"),
    ("kill@nan", "bad time"),
    ("kill@inf", "bad time"),
    ("kill@5s:worker=x", "integer worker id"),
    ("kill@5s:worker=-1", "integer worker id"),
    ("kill@5s:worker", "not KEY=VALUE"),
    ("kill@5s:worker=", "not KEY=VALUE"),
    ("kill@5s:worker=1:worker=2", "given twice"),
    ("kill@5s:stage=1", "unknown option"),
    ("hang@5s:duration=0", "duration must be > 0"),
    ("hang@5s:duration=soon", "duration"),
    ("hang@5s:pidfile=/run/peer.pid", "pidfile goes with kill alone"),
    ("kill@5s:worker=1:pidfile=/run/peer.pid", "pidfile goes with kill alone"),
])
def test_parse_fault_spec_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_fault_spec(text)


def test_parse_time_units():
    assert parse_time_s("5") == 5.0 and parse_time_s("5s") == 5.0
    assert parse_time_s("250ms") == pytest.approx(0.25) and parse_time_s("0.5") == 0.5


def test_cli_rejects_a_bad_fault_before_sending_anything(capsys):
    assert main(["bench", "--url", "http://127.0.0.1:9", "--fault", "kill@soon"]) == 2
    assert "bad fault 'kill@soon'" in capsys.readouterr().err


# --- metrics on hand-made records -----------------------------------------------------------

def rec(index: int, sent: float, finished: float, first: float | None, token_times=(), ok: bool = True,
        tokens: int | None = None) -> RequestRecord:
    token_times = tuple((t, 1) for t in token_times)
    n = len(token_times) if tokens is None else tokens
    return RequestRecord(index=index, prompt_index=0, scheduled_s=sent, sent_s=sent, finished_s=finished,
                         first_token_s=first, output_tokens=n, content_chunks=len(token_times), ok=ok,
                         status_code=200 if ok else None, error=None if ok else "boom",
                         token_times=token_times)


def stream(begin: float, end: float, rate: float) -> list[float]:
    """Arrival times at `rate`/s in [begin, end), each half a gap in, so none sits on a window edge."""
    gap = 1.0 / rate
    count = round((end - begin) * rate)
    return [begin + (i + 0.5) * gap for i in range(count)]


def dip_records(after: list[float]) -> list[RequestRecord]:
    """100 tok/s for 5 s, then `after` (times); one carrier record, plus one that ends the run at 12 s."""
    times = stream(0.0, 5.0, 100) + after
    return [rec(0, 0.0, max(times) + 0.01, times[0], times), rec(1, 11.0, 12.0, 11.5, [11.5])]


def test_recovery_after_a_one_second_outage_and_a_half_speed_second():
    # fault at 5.0: nothing for 1 s, 50 tok/s for 0.5 s, then 100 tok/s again. The window
    # [6.3, 7.3) is the first with >= 90 tokens (10 at half speed + 80): recovery 1.3 s.
    records = dip_records(stream(6.0, 6.5, 50) + stream(6.5, 10.0, 100))
    pre_level, recovery = recovery_time(records, 5.0)
    assert pre_level == pytest.approx(100.0)  # mean over [2, 5)
    assert recovery == pytest.approx(1.3)
    series = {round(begin, 6): level for begin, level in throughput_series(records, 5.0, 12.0)}
    assert series[5.0] == 0.0 and series[6.0] == pytest.approx(75.0) and series[6.2] == pytest.approx(85.0)
    assert series[7.0] == pytest.approx(100.0)
    (metrics,) = fault_metrics(records, [FaultRecord("kill", 5.0, worker=1, injected_s=5.0, ok=True)])
    assert metrics["recovery_to_90pct_s"] == pytest.approx(1.3)
    assert metrics["pre_fault_tokens_per_s"] == pytest.approx(100.0)


def test_recovery_is_zero_without_a_dip_and_none_without_a_return():
    assert recovery_time(dip_records(stream(5.0, 10.0, 100)), 5.0)[1] == pytest.approx(0.0)
    never = dip_records(stream(5.0, 10.0, 60))  # 60 % of the level until the end
    assert recovery_time(never, 5.0) == (pytest.approx(100.0), None)
    # the pre-fault level uses min(fault time, 3 s): a fault at 1.0 s looks at [0, 1)
    assert recovery_time(dip_records(stream(5.0, 10.0, 100)), 1.0)[0] == pytest.approx(100.0)
    assert recovery_time(dip_records([]), 0.0) == (None, None)  # a fault at the start has no level


def test_recovery_ignores_failed_requests_and_weighs_chunks_by_completion_tokens():
    times = stream(0.0, 5.0, 100) + stream(6.0, 10.0, 100)
    failed_filler = rec(2, 5.0, 6.0, 5.05, stream(5.0, 6.0, 100), ok=False)  # delivered, then failed
    records = [rec(0, 0.0, 10.0, times[0], times), failed_filler, rec(1, 11.0, 12.0, 11.5, [11.5])]
    # a 1 s outage: [5.9, 6.9) is the first window with 90 % of the level (the failed request's
    # tokens in [5, 6) would have hidden the outage)
    assert recovery_time(records, 5.0)[1] == pytest.approx(0.9)
    # a server that sent 2 tokens per delta: the level doubles, the recovery time stays
    doubled = [rec(0, 0.0, 10.0, times[0], times, tokens=2 * len(times)), records[2]]
    level, recovery = recovery_time(doubled, 5.0)
    assert level == pytest.approx(200.0) and recovery == pytest.approx(0.9)


def test_first_token_after_fault():
    records = [
        rec(0, 0.0, 1.0, 0.2),
        rec(1, 4.8, 7.0, 5.5),  # in flight at the fault: its first token does not count
        rec(2, 5.1, 7.5, 6.4),
        rec(3, 5.3, 7.2, 6.0),  # sent later, answered first: the earliest first token
        rec(4, 5.4, 5.9, None, ok=False),  # no token at all
    ]
    assert first_token_after(records, 5.0) == pytest.approx(1.0)
    assert first_token_after(records, 5.1) == pytest.approx(0.9)  # sent exactly at the fault counts
    assert first_token_after(records, 6.0) is None  # nothing sent after it


def test_failure_window_latencies_and_lost_requests():
    records = [
        rec(0, 0.0, 1.0, 0.1),  # done before the fault: outside
        rec(1, 9.0, 12.0, 9.2),  # in flight at 10.0: inside
        rec(2, 9.5, 10.5, None, ok=False),  # in flight and lost
        rec(3, 12.0, 14.0, 13.0),  # sent 2 s after: inside
        rec(4, 15.0, 15.5, 15.1),  # sent exactly window_s after: inside
        rec(5, 15.5, 16.0, 15.6),  # later: outside
    ]
    assert [r.index for r in failure_window(records, 10.0, 5.0)] == [1, 2, 3, 4]
    faults = [FaultRecord("hang", 10.0, worker=3, injected_s=10.0, acked_s=10.01, ok=True, status_code=202),
              FaultRecord("kill", 20.0, worker=1, error="POST /api/faults answered 404: no worker")]
    injected, missed = fault_metrics(records, faults, window_s=5.0)
    assert injected["window"]["requests"] == 4 and injected["window"]["failed"] == 1
    assert injected["lost_requests"] == 1 and injected["lost_request_indices"] == [2]
    assert injected["window"]["latency_mean_s"] == pytest.approx((3.0 + 2.0 + 0.5) / 3)
    assert injected["window"]["ttft_mean_s"] == pytest.approx((0.2 + 1.0 + 0.1) / 3)
    assert injected["first_token_after_fault_s"] == pytest.approx(3.0)
    assert injected["kind"] == "hang" and injected["worker"] == 3 and injected["window_s"] == 5.0
    assert missed["ok"] is False and missed["recovery_to_90pct_s"] is None and missed["window"] is None
    table = format_fault_markdown([("run", summarize(records), [injected, missed])])
    lines = table.splitlines()
    assert len(lines) == 4 and "| run | hang@10s | 3 |" in lines[2] and "(not injected)" in lines[3]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    json.dumps(injected)  # JSON-ready
    assert format_fault_markdown([("run", summarize(records), [])]) == ""


# --- faults posted to a fake daemon ---------------------------------------------------------

def fake_daemon(log: list, token: str = TOKEN):
    """The streaming server, plus /api/cluster (pipeline 0 routed 4 -> 5 -> 6) and /api/faults,
    which logs ("cluster"|"fault", time, body) and refuses a wrong token."""

    async def cluster(request: Request) -> Response:
        log.append(("cluster", time.perf_counter(), None))
        return JSONResponse({
            "workers": [{"id": w, "pid": 100 + w, "state": "healthy"} for w in range(8)],
            "pipelines": [{"id": 1, "route": [0, 1, 2], "state": "serving"},
                          {"id": 0, "route": [4, 5, 6], "state": "serving"}]})

    async def faults(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse({"error": {"message": "Incorrect admin token"}}, status_code=401)
        body = await request.json()
        log.append(("fault", time.perf_counter(), body))
        return JSONResponse({"accepted": True, **body}, status_code=202)

    chat_log: list = []
    app = stream_server_app(log=chat_log, extra_routes=[
        Route("/api/cluster", cluster), Route("/api/faults", faults, methods=["POST"])])
    return app, chat_log


async def test_faults_are_posted_during_the_run_with_the_token():
    log: list = []
    app, chats = fake_daemon(log)
    faults = [FaultSpec("kill", 0.25), FaultSpec("hang", 0.5, worker=7, duration_s=1.0)]
    with live_server(app) as url:
        async with asyncio.timeout(DEADLINE_S):
            result = await run_load(url, rate=40.0, requests=60, output_tokens=5, seed=1, model=MODEL_ID,
                                    faults=faults, admin_token=TOKEN, warmup=3)
    assert [r.index for r in result.records] == list(range(60)) and all(r.ok for r in result.records)
    assert all(len(r.token_times) == 5 for r in result.records)
    assert len(chats) == 65  # warmup requests too, and one probe request after each fault
    kinds = [entry[0] for entry in log]
    # the recovery counters are read before and after the run; the first fault's worker was looked up
    assert kinds == ["cluster", "cluster", "fault", "fault", "cluster"]
    assert log[2][2] == {"worker": 5, "kind": "kill"}  # pipeline 0's middle stage
    assert log[3][2] == {"worker": 7, "kind": "hang", "duration_s": 1.0}
    # posted while the load went on, in order: some requests arrived before each, some after
    for _, posted, _ in log[2:4]:
        assert 3 < sum(t < posted for _, t in chats) < 65
    kill, hang = result.faults
    assert kill.ok and kill.worker == 5 and kill.stage == 1 and kill.status_code == 202
    assert kill.probe_first_token_s is not None and kill.probe_first_token_s > 0
    assert hang.ok and hang.worker == 7 and hang.stage is None
    assert 0.25 <= kill.injected_s <= kill.acked_s <= hang.injected_s and hang.injected_s >= 0.5
    sent = sorted(r.sent_s for r in result.records)
    assert sent[0] < kill.injected_s < hang.injected_s < sent[-1]
    metrics = result.fault_metrics
    assert metrics[0]["first_token_after_fault_s"] is not None and metrics[0]["window"]["requests"] > 0
    assert result.to_json()["faults"][1]["worker"] == 7


async def test_a_fault_after_the_last_request_and_a_wrong_token_are_reported():
    log: list = []
    app, _ = fake_daemon(log)
    with live_server(app) as url:
        async with asyncio.timeout(DEADLINE_S):
            result = await run_load(url, rate=float("inf"), requests=2, output_tokens=2, seed=0,
                                    model=MODEL_ID, admin_token="wrong",
                                    faults=[FaultSpec("kill", 0.0), FaultSpec("kill", 60.0)])
    refused, late = result.faults
    assert not refused.ok and refused.status_code == 401 and "Incorrect admin token" in refused.error
    assert not late.ok and late.injected_s is None and "before its time" in late.error
    # counters before and after the run, the worker lookup; the refused POST logs nothing
    assert [entry[0] for entry in log] == ["cluster", "cluster", "cluster"]


def test_cli_bench_with_a_fault_reads_the_token_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    state = tmp_path / ".local" / "state" / "kevlard"
    state.mkdir(parents=True)
    log: list = []
    app, _ = fake_daemon(log)
    out = tmp_path / "run.json"
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        (state / f"admin_token.{port}").write_text(TOKEN + "\n")  # the one of the daemon at --url
        (state / f"admin_token.{port + 1}").write_text("another daemon's\n")
        code = main(["bench", "--url", url, "--rate", "50", "--requests", "20", "--output-tokens", "3",
                     "--fault", "device_error@200ms", "--fault-stage", "0", "--warmup", "2",
                     "--json", str(out), "--label", "f", "--timeout-s", str(DEADLINE_S)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [entry[2] for entry in log if entry[0] == "fault"] == [{"worker": 4, "kind": "device_error"}]
    assert "| f | device_error@0.2s | 4 |" in captured.out
    data = json.loads(out.read_text())
    (fault,) = data["faults"]
    assert fault["ok"] and fault["stage"] == 0 and fault["injected_s"] >= 0.2
    assert {"first_token_after_fault_s", "recovery_to_90pct_s", "pre_fault_tokens_per_s", "window",
            "lost_requests"} <= set(fault)
    assert data["settings"]["warmup"] == 2 and data["settings"]["faults"][0]["kind"] == "device_error"
    assert len(data["records"]) == 20 and data["records"][0]["token_times"]


def test_cli_bench_fault_without_a_token_fails_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["bench", "--url", "http://127.0.0.1:9", "--fault", "kill@1s"]) == 1
    assert "admin token" in capsys.readouterr().err


def test_recovery_delta_gives_tokens_recomputed_per_resumed_request():
    from kevlard.bench.loadgen import recovery_delta

    before = {"failures": 1, "reroutes": 1, "requests_resumed_replica": 2, "requests_replayed": 0,
              "tokens_recomputed": 3, "recovery_seconds": [0.01]}
    after = {"failures": 2, "reroutes": 2, "requests_resumed_replica": 5, "requests_replayed": 1,
             "tokens_recomputed": 11, "recovery_seconds": [0.01, 0.02]}
    delta = recovery_delta(before, after)
    assert delta["failures"] == 1 and delta["requests_resumed_replica"] == 3 and delta["requests_replayed"] == 1
    assert delta["tokens_recomputed_per_resumed_request"] == 2.0  # 8 tokens over 4 requests
    assert delta["recovery_seconds"] == [0.02]  # the failure of this run, not the earlier one
    assert recovery_delta(before, None) is None  # a peer without the counters
    assert recovery_delta(before, before)["tokens_recomputed_per_resumed_request"] is None
    row = format_fault_markdown([("run", summarize([]), [{"kind": "kill", "at_s": 1.0, "ok": True}], delta)])
    assert row.splitlines()[2].endswith("| 3 / 1 | 2.0 |")


async def test_a_pidfile_kill_sigkills_that_process_and_needs_no_admin_token(tmp_path):
    """The fault of a server without /api/faults: the process its pidfile names is SIGKILLed
    (here a stand-in process; the load's server keeps answering, so the probe gets its token)."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        pidfile = tmp_path / "server.pid"
        pidfile.write_text(f"{victim.pid}\n")
        app = stream_server_app()
        with live_server(app) as url:
            async with asyncio.timeout(DEADLINE_S):
                result = await run_load(url, rate=40.0, requests=20, output_tokens=3, seed=1, model=MODEL_ID,
                                        faults=[parse_fault_spec(f"kill@0.2s:pidfile={pidfile}")])
        assert victim.wait(timeout=10) == -signal.SIGKILL
        (fault,) = result.faults
        assert fault.ok and fault.worker == victim.pid and fault.injected_s >= 0.2
        assert fault.probe_first_token_s is not None and fault.probe_first_token_s > 0
        missing = await run_load_fault_missing_pidfile(tmp_path)
        assert not missing.ok and "cannot kill" in missing.error
    finally:
        victim.kill()


async def run_load_fault_missing_pidfile(tmp_path):
    with live_server(stream_server_app()) as url:
        async with asyncio.timeout(DEADLINE_S):
            result = await run_load(url, rate=40.0, requests=5, output_tokens=2, seed=1, model=MODEL_ID,
                                    faults=[parse_fault_spec(f"kill@0.05s:pidfile={tmp_path / 'none.pid'}")])
    return result.faults[0]


async def test_the_probe_waits_for_a_first_token_longer_than_the_admin_calls_timeout():
    """A probe sent into an (emulated) reload waits it out: the admin client's short timeout, meant
    for /api/cluster and /api/faults, must not make it give up (it did: no probe time at all)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse

    from kevlard.bench.faults import _probe_first_token

    async def chat(request: Request) -> Response:
        async def events():
            await asyncio.sleep(0.6)  # the first token comes after the client's timeout
            chunk = {"choices": [{"index": 0, "delta": {"content": "OK"}}]}
            yield "data: " + json.dumps(chunk) + "\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with live_server(app) as url:
        async with httpx.AsyncClient(timeout=0.2) as client:
            sent = time.perf_counter()
            got = await _probe_first_token(client, url, MODEL_ID)
    assert got is not None and got - sent >= 0.6
