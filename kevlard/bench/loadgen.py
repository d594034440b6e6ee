"""An open-loop load generator for OpenAI-compatible servers (kevlard or any peer).

Open loop: request i is sent at its scheduled time from a seeded Poisson process whatever the
earlier requests are doing, so a slow or failing server faces the same offered load as a fast
one, and its queueing shows up in latency instead of being hidden by a client that waits.
Every request is a streamed chat completion; the client measures time to first token and
end-to-end latency itself.

Faults (`--fault kill@5s`) are posted to the daemon's `POST /api/faults` at their times from
the start of the run, while the load goes on (faults.py); report.py turns the records and the
injection times into recovery metrics.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TextIO

import httpx

from kevlard.bench.errors import MAX_ERROR_CHARS, BenchError
from kevlard.bench.faults import ADMIN_TIMEOUT_S, FaultSpec, _collect_faults, _inject, read_admin_token
from kevlard.bench.prompts import PROMPTS
from kevlard.bench.report import FAILURE_WINDOW_S, FaultRecord, RequestRecord, fault_metrics, summarize

# (sent, done, failed), called after every send and every finish.
ProgressCallback = Callable[[int, int, int], None]

MODELS_TIMEOUT_S = 30.0


@dataclass
class BenchResult:
    url: str
    model: str
    label: str
    started_at: str  # ISO 8601, UTC
    settings: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    window_s: float = FAILURE_WINDOW_S
    warmup_failed: int = 0  # of the settings' warmup requests
    recovery: dict[str, Any] | None = None  # the daemon's recovery counters over the run (kevlard only)

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.records)

    @property
    def fault_metrics(self) -> list[dict[str, Any]]:
        return fault_metrics(self.records, self.faults, self.window_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "url": self.url,
            "model": self.model,
            "started_at": self.started_at,
            "settings": self.settings,
            "summary": self.summary,
            "warmup_failed": self.warmup_failed,
            "faults": self.fault_metrics,
            "recovery": self.recovery,
            "records": [record.to_json() for record in self.records],
        }


def check_load_args(rate: float, requests: int, output_tokens: int, timeout_s: float) -> None:
    """Raise ValueError for settings no run can use."""
    if not rate > 0:  # also rejects NaN; inf means all at once
        raise ValueError(f"rate must be > 0 requests/s (inf: all at once), got {rate}")
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if output_tokens < 1:
        raise ValueError(f"output tokens must be >= 1, got {output_tokens}")
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 s, got {timeout_s}")



def poisson_schedule(rate: float, count: int, seed: int) -> list[float]:
    """Send times (s from the start) of `count` Poisson arrivals at `rate`/s; the first is at 0."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def chat_body(model: str, prompt: str, output_tokens: int, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": output_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:  # vLLM's extension fields: generate exactly output_tokens where supported
        body["ignore_eos"] = True
        body["min_tokens"] = output_tokens
    return body


async def run_load(url: str, rate: float, requests: int, output_tokens: int, seed: int,
                   model: str | None = None, *, api_key: str | None = None, ignore_eos: bool = True,
                   timeout_s: float = 300.0, label: str = "", prompts: Sequence[str] = PROMPTS,
                   progress: ProgressCallback | None = None, faults: Sequence[FaultSpec] = (),
                   fault_stage: int | None = None, admin_token: str | None = None,
                   window_s: float = FAILURE_WINDOW_S, warmup: int = 0) -> BenchResult:
    """Send `requests` streamed chat completions to `url` at Poisson times; measure each.

    `warmup` requests are sent all at once and awaited first, unmeasured. Each of `faults` is
    posted to `url`/api/faults at its time from the start of the measured run (the token:
    `admin_token`, else the daemon's token file); a fault with no worker hits the worker of
    stage `fault_stage` (default: the middle one) of pipeline 0 as /api/cluster names it then.
    """
    check_load_args(rate, requests, output_tokens, timeout_s)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not window_s > 0:
        raise ValueError(f"failure window must be > 0 s, got {window_s}")
    base = url.rstrip("/")
    if any(spec.pidfile is None for spec in faults) and not admin_token:
        admin_token = read_admin_token(url)  # a pidfile kill needs no admin token
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # One connection per request at most, so that nothing queues on the client side; no proxies
    # from the environment, so that the numbers are the server's.
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(headers=headers, limits=limits, trust_env=False,
                                 timeout=httpx.Timeout(timeout_s, pool=None)) as client:
        if model is None:
            model = await discover_model(client, base)
        result = BenchResult(
            url=base, model=model, label=label,
            started_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            settings={"rate": rate, "requests": requests, "output_tokens": output_tokens,
                      "seed": seed, "ignore_eos": ignore_eos, "timeout_s": timeout_s,
                      "warmup": warmup, "faults": [spec.to_json() for spec in faults],
                      "fault_stage": fault_stage, "window_s": window_s},
            window_s=window_s)
        if warmup:
            result.warmup_failed = await _warmup(client, base, model, warmup, output_tokens,
                                                 ignore_eos, timeout_s, prompts)
        counts = _Counts(progress)
        schedule = poisson_schedule(rate, requests, seed)
        admin = httpx.AsyncClient(trust_env=False, timeout=ADMIN_TIMEOUT_S,
                                  headers={"Authorization": f"Bearer {admin_token}"} if admin_token else {})
        counters_before = await _recovery_counters(admin, base)
        start = time.perf_counter()
        tasks: list[asyncio.Task[RequestRecord]] = []
        fault_tasks = [asyncio.create_task(_inject(admin, base, spec, fault_stage, start, model))
                       for spec in faults]
        try:
            for index, at in enumerate(schedule):
                delay = at - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                prompt_index = index % len(prompts)
                body = chat_body(model, prompts[prompt_index], output_tokens, ignore_eos)
                request = _Request(index, prompt_index, at, body)
                tasks.append(asyncio.create_task(
                    _send(client, base, request, start, timeout_s, counts)))
            result.records = list(await asyncio.gather(*tasks))
            result.faults = await _collect_faults(faults, fault_tasks, start)
            result.recovery = recovery_delta(counters_before, await _recovery_counters(admin, base))
        finally:
            for task in [*tasks, *fault_tasks]:
                task.cancel()
            await admin.aclose()
    return result


RECOVERY_COUNTERS = ("failures", "reroutes", "rehosts", "restarts", "requests_resumed_replica",
                     "requests_replayed", "tokens_recomputed")


async def _recovery_counters(client: httpx.AsyncClient, base: str) -> dict[str, Any] | None:
    """kevlard's recovery counters from GET /api/cluster; None from a server without them."""
    try:
        response = await client.get(f"{base}/api/cluster")
        counters = response.json().get("recovery") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return counters if isinstance(counters, dict) else None


def recovery_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the counters did during the run, and the tokens recomputed per resumed request."""
    if before is None or after is None:
        return None
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in RECOVERY_COUNTERS
             if isinstance(after.get(key, 0), int) and isinstance(before.get(key, 0), int)}
    resumed = delta.get("requests_resumed_replica", 0) + delta.get("requests_replayed", 0)
    # the daemon's times from each failure until its pipeline served again (a reroute, or a restart)
    recoveries = delta.get("reroutes", 0) + delta.get("restarts", 0)
    times = after.get("recovery_seconds") or []
    delta["recovery_seconds"] = list(times[len(times) - recoveries:]) if 0 < recoveries <= len(times) else []
    delta["tokens_recomputed_per_resumed_request"] = (
        delta.get("tokens_recomputed", 0) / resumed if resumed else None)
    return delta


async def _warmup(client: httpx.AsyncClient, base: str, model: str, count: int, output_tokens: int,
                  ignore_eos: bool, timeout_s: float, prompts: Sequence[str]) -> int:
    """Send `count` requests at once and await them all; how many failed."""
    start = time.perf_counter()
    counts = _Counts(None)
    records = await asyncio.gather(*(
        _send(client, base, _Request(i, i % len(prompts), 0.0,
                                     chat_body(model, prompts[i % len(prompts)], output_tokens, ignore_eos)),
              start, timeout_s, counts)
        for i in range(count)))
    return sum(not r.ok for r in records)


async def discover_model(client: httpx.AsyncClient, base: str) -> str:
    """The first model id that GET /v1/models lists."""
    target = f"{base}/v1/models"
    try:
        response = await client.get(target, timeout=MODELS_TIMEOUT_S)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {target}: {e!r}") from e
    if response.is_error:
        raise BenchError(f"GET {target} answered {response.status_code}: {response.text[:MAX_ERROR_CHARS]}")
    try:
        models = response.json()["data"]
        return str(models[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"GET {target} listed no model: {response.text[:MAX_ERROR_CHARS]!r}") from e


@dataclass(frozen=True)
class _Request:
    index: int
    prompt_index: int
    scheduled_s: float
    body: dict[str, Any]


class _Counts:
    def __init__(self, progress: ProgressCallback | None) -> None:
        self.sent = self.done = self.failed = 0
        self._progress = progress

    def on_sent(self) -> None:
        self.sent += 1
        self._report()

    def on_done(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        self._report()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self.sent, self.done, self.failed)


class _Stream:
    """What one streamed answer has delivered so far."""

    def __init__(self) -> None:
        self.first_token_s: float | None = None
        self.content_chunks = 0
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        self.saw_done = False
        self.error: str | None = None
        self.token_times: list[tuple[float, int]] = []
        self.pieces: list[str] = []

    def feed(self, data: str, now_s: float) -> None:
        if data == "[DONE]":
            self.saw_done = True
            return
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError(f"stream chunk is not an object: {data[:MAX_ERROR_CHARS]!r}")
        if chunk.get("error"):
            self.error = f"error in stream: {json.dumps(chunk['error'])[:MAX_ERROR_CHARS]}"
            return
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.completion_tokens = usage["completion_tokens"]
        for choice in chunk.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                self.pieces.append(choice["delta"]["content"])
                self.content_chunks += 1
                self.token_times.append((round(now_s, 6), 1))
                if self.first_token_s is None:
                    self.first_token_s = now_s
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    @property
    def output_tokens(self) -> int:
        return self.content_chunks if self.completion_tokens is None else self.completion_tokens


async def _send(client: httpx.AsyncClient, base: str, request: _Request, start: float,
                timeout_s: float, counts: _Counts) -> RequestRecord:
    def now() -> float:
        return time.perf_counter() - start

    stream = _Stream()
    status_code: int | None = None
    error: str | None = None
    sent_s = now()
    counts.on_sent()
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", f"{base}/v1/chat/completions", json=request.body) as response:
                status_code = response.status_code
                if response.is_error:
                    text = (await response.aread()).decode(errors="replace")
                    error = f"HTTP {status_code}: {text[:MAX_ERROR_CHARS]}"
                else:
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            stream.feed(line[len("data:"):].strip(), now())
                        if stream.saw_done or stream.error:
                            break
                    error = stream.error
                    if error is None and not (stream.saw_done or stream.finish_reason):
                        error = "stream ended before [DONE]"
    except TimeoutError:
        error = f"timed out after {timeout_s:g} s"
    except Exception as e:  # one request's failure is a measurement, not the end of the run
        error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    record = RequestRecord(
        index=request.index, prompt_index=request.prompt_index, scheduled_s=request.scheduled_s,
        sent_s=sent_s, finished_s=now(), first_token_s=stream.first_token_s,
        output_tokens=stream.output_tokens, content_chunks=stream.content_chunks,
        ok=error is None, status_code=status_code, error=error, finish_reason=stream.finish_reason,
        token_times=tuple(stream.token_times), text="".join(stream.pieces))
    counts.on_done(record.ok)
    return record


class StderrProgress:
    """`done/sent/failed`, redrawn in place on a terminal, else one line every `every` finishes."""

    def __init__(self, total: int, stream: TextIO | None = None, every: int = 10) -> None:
        self._total = total
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._every = every
        self._last_done = 0

    def __call__(self, sent: int, done: int, failed: int) -> None:
        line = f"bench: {done}/{self._total} done, {sent} sent, {failed} failed"
        if self._tty:
            self._stream.write("\r" + line)
            self._stream.flush()
        elif done != self._last_done and (done % self._every == 0 or done == self._total):
            self._stream.write(line + "\n")
            self._stream.flush()
        self._last_done = done

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
