"""The public API of a real daemon, as a user meets it: the official openai client and curl on the
embedded SmolLM2, every bad input answered with its 4xx while the daemon keeps serving, 429 when
the queue is full, disconnects that free their blocks, and a clean shutdown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.daemon_proc import running_daemon, shm_segments, start_daemon
from tests.tiny_models import make_tiny_model

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    with running_daemon([], tmp_path_factory.mktemp("smol")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", num_layers=4)


def good_request(client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hi."}],
                                                  "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_chat_and_completions(smol):
    import openai

    client = openai.OpenAI(base_url=smol.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens >= 1 and chat.choices[0].finish_reason in ("stop", "length")
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}]):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == chat.choices[0].message.content  # greedy: streamed == not streamed
    assert finish == chat.choices[0].finish_reason
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert text.choices[0].text.strip() and text.usage.prompt_tokens >= 5


def test_curl_streams_sse_ending_with_done(smol):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Count to three."}],
                       "max_tokens": 8, "stream": True})
    out = subprocess.run(["curl", "-sN", smol.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=120, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
])
def test_bad_input_gets_its_4xx_and_the_daemon_keeps_serving(smol, body, status, param):
    with smol.client() as client:
        if isinstance(body, bytes):
            r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        else:
            r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param is not None:
            assert error["param"] == param
        good_request(client)


def test_unknown_route_is_an_openai_error(smol):
    r = httpx.get(smol.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_disconnecting_client_aborts_and_frees_its_blocks(smol):
    with smol.client() as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    # each pipeline reports its own load (the page's worker cards show it): one runs it
                    with smol.client() as other:
                        pipes = other.get("/api/cluster").json()["pipelines"]
                    break  # got a token: now hang up
        assert sorted(p["num_running"] for p in pipes) == [0] * (len(pipes) - 1) + [1], pipes
        busy = next(p for p in pipes if p["num_running"])
        assert busy["kv_usage"] > 0 and all(p["kv_usage"] == 0 for p in pipes if p is not busy), pipes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = client.get("/api/cluster").json()
            if snap["num_running"] == 0 and snap["num_waiting"] == 0:
                break
            time.sleep(0.1)
        assert snap["num_running"] == 0 and snap["kv_usage"] == 0.0
        good_request(client)


def test_full_queue_answers_429_with_retry_after(tiny_dir, tmp_path):
    conf = tmp_path / "k.toml"
    conf.write_text("[scheduler]\nmax_running = 1\nmax_waiting = 1\n")
    args = ["--config", str(conf), "--model", str(tiny_dir), "--devices", "cpu:1", "--pipelines", "1",
            "--stages", "1", "--spares", "0"]
    with running_daemon(args, tmp_path) as daemon:
        results = []

        def send():
            with daemon.client() as c:
                r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 200, "ignore_eos": True})
                results.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted(code for code, _, _ in results)
        assert codes.count(200) >= 2 and 429 in codes
        for code, retry_after, body in results:
            if code == 429:
                assert retry_after is not None and float(retry_after) > 0
                assert body["error"]["type"] and body["error"]["code"]
        with daemon.client() as c:
            assert c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}).status_code == 200


def test_a_burst_that_fits_the_running_sets_is_served_whatever_the_waiting_queue(tiny_dir, tmp_path):
    # 8 requests at once on an idle daemon with room for 16 running: none has to queue, so a
    # waiting queue of 1 must not turn any away (it did: admission waited for the next step)
    conf = tmp_path / "k.toml"
    conf.write_text("[scheduler]\nmax_running = 16\nmax_waiting = 1\n")
    args = ["--config", str(conf), "--model", str(tiny_dir), "--devices", "cpu:1", "--pipelines", "1",
            "--stages", "1", "--spares", "0"]
    with running_daemon(args, tmp_path) as daemon:
        codes = []
        start = threading.Barrier(8)

        def send():
            with daemon.client() as c:
                start.wait()
                codes.append(c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 40,
                                                             "ignore_eos": True}).status_code)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert codes == [200] * 8


@pytest.mark.parametrize("to", ["daemon", "group-SIGTERM", "group-SIGINT", "group-SIGHUP"])
def test_sigterm_drains_in_flight_requests_then_exits_clean(tiny_dir, tmp_path, to):
    """Signalled alone, or with its whole process group as systemd's KillMode=control-group, a
    terminal's Ctrl-C and a closed terminal do: the workers once died with the group, and the draining daemon recovered
    from four failures (replaying the requests) before it exited."""
    args = ["--model", str(tiny_dir), "--devices", "cpu:2", "--pipelines", "1", "--stages", "2", "--spares", "1"]
    daemon = start_daemon(args, tmp_path, new_session=to != "daemon")
    got = {}

    def stream():
        with daemon.client() as c, c.stream("POST", "/v1/completions", json={
                "prompt": "hello", "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            got["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(1.0)
    pids = [w["pid"] for w in httpx.get(daemon.url + "/api/cluster").json()["workers"]]
    if to == "daemon":
        assert daemon.stop(signal.SIGTERM) == 0
    else:
        os.killpg(daemon.proc.pid, getattr(signal, to.split("-")[1]))
        assert daemon.proc.wait(60) == 0
    t.join(60)
    assert got["lines"][-1] == "data: [DONE]"
    last = json.loads(got["lines"][-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"  # finished, not cut off
    assert "state=dead" not in daemon.log() and "pipeline_down" not in daemon.log()  # no worker died of it
    assert shm_segments(daemon.proc.pid) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_killed_worker_and_crashed_daemon_leave_no_shared_memory(tiny_dir, tmp_path):
    args = ["--model", str(tiny_dir), "--devices", "cpu:2", "--pipelines", "2", "--stages", "1", "--spares", "0"]
    daemon = start_daemon(args, tmp_path)
    workers = httpx.get(daemon.url + "/api/cluster").json()["workers"]
    os.kill(workers[0]["pid"], signal.SIGKILL)
    with daemon.client() as c:  # the other pipeline keeps serving
        assert c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4}).status_code == 200
    # now the daemon itself crashes: its shared memory stays behind ...
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(30)
    assert shm_segments(daemon.proc.pid) != []
    # ... its workers notice their channel closed and exit ...
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{workers[1]['pid']}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{workers[1]['pid']}")
    # ... and the next daemon start removes the stale segment (any daemon started on this machine
    # cleans up after dead ones; in a lone test run it is this one, and its log says so)
    with running_daemon(args, tmp_path):
        assert shm_segments(daemon.proc.pid) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_streams_still_running_when_the_drain_times_out_end_with_an_error_event(tiny_dir, tmp_path, sig):
    """With `drain_timeout_s = 0` nothing may finish: each open stream gets the shutting-down error
    event and `[DONE]` (a client can tell it to retry), not a connection cut mid-chunk; the daemon
    exits 0 and leaves nothing behind. SIGHUP (a closed terminal or ssh session) stops it the same way."""
    conf = tmp_path / "kevlard.toml"
    conf.write_text("[server]\ndrain_timeout_s = 0\n")
    args = ["--config", str(conf), "--model", str(tiny_dir), "--devices", "cpu:2", "--pipelines", "1",
            "--stages", "2", "--spares", "0"]
    daemon = start_daemon(args, tmp_path)
    got: dict = {}
    streaming = [threading.Event() for _ in range(4)]

    def stream(i):
        lines = got[i] = []
        try:
            with daemon.client() as c, c.stream("POST", "/v1/completions", json={
                    "prompt": f"hello {i}", "max_tokens": 480, "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        streaming[i].set()
        except httpx.HTTPError as e:
            got[i] = repr(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(4):
        assert streaming[i].wait(60), f"stream {i} never started"
    assert daemon.stop(sig) == 0
    for t in threads:
        t.join(60)
    for i in range(4):
        assert isinstance(got[i], list), f"stream {i} was cut: {got[i]}"
        assert got[i][-1] == "data: [DONE]", got[i][-3:]
        last = json.loads(got[i][-2][len("data: "):])
        assert last["error"]["code"] == "shutting_down", last
    assert shm_segments(daemon.proc.pid) == []
