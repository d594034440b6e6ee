"""An open-loop load generator for OpenAI-compatible servers (kevlard or any peer).

Open loop: request i is sent at its scheduled time from a seeded Poisson process whatever the
earlier requests are doing, so a slow or failing server faces the same offered load as a fast
one, and its queueing shows up in latency instead of being hidden by a client that waits.
Every request is a streamed chat completion; the client measures time to first token and
end-to-end latency itself.

Faults (`--fault kill@5s`) are posted to the daemon's `POST /api/faults` at their times from
the start of the run, while the load goes on; report.py turns the records and the injection
times into recovery metrics.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import httpx

from kevlard.bench.prompts import PROMPTS
from kevlard.bench.report import FAILURE_WINDOW_S, FaultRecord, RequestRecord, fault_metrics, summarize

# (sent, done, failed), called after every send and every finish.
ProgressCallback = Callable[[int, int, int], None]

MAX_ERROR_CHARS = 300
MODELS_TIMEOUT_S = 30.0
ADMIN_TIMEOUT_S = 10.0  # GET /api/cluster and POST /api/faults, each
FAULT_KINDS = ("kill", "hang", "slow", "device_error")  # what POST /api/faults accepts


class BenchError(Exception):
    """The benchmark cannot run at all (server unreachable, no model); one request failing is not this."""


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


@dataclass(frozen=True)
class FaultSpec:
    """One `--fault KIND@TIME[:worker=ID][:duration=TIME]`."""

    kind: str
    at_s: float
    worker: int | None = None  # None: the worker of --fault-stage of pipeline 0 at injection
    duration_s: float | None = None  # for hang/slow; None: the server's default

    def __str__(self) -> str:
        text = f"{self.kind}@{self.at_s:g}s"
        if self.worker is not None:
            text += f":worker={self.worker}"
        if self.duration_s is not None:
            text += f":duration={self.duration_s:g}s"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "at_s": self.at_s, "worker": self.worker, "duration_s": self.duration_s}


_TIME = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<unit>ms|s)?")


def parse_time_s(text: str) -> float:
    """Seconds from '5', '5s', '1.5s' or '500ms'; ValueError for anything else."""
    match = _TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad time {text!r}: expected seconds like 5, 5s, 1.5s or 500ms")
    value = float(match["number"])
    return value / 1000.0 if match["unit"] == "ms" else value


def parse_fault_spec(text: str) -> FaultSpec:
    """`KIND@TIME[:worker=ID][:duration=TIME]`, e.g. kill@5s, hang@8s:worker=3, slow@500ms:duration=2s."""
    head, *options = text.strip().split(":")
    kind, at, time_text = head.partition("@")
    kind = kind.strip()
    if not at:
        raise ValueError(f"bad fault {text!r}: expected KIND@TIME[:worker=ID], e.g. kill@5s")
    if kind not in FAULT_KINDS:
        raise ValueError(f"bad fault {text!r}: kind must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
    try:
        at_s = parse_time_s(time_text)
    except ValueError as e:
        raise ValueError(f"bad fault {text!r}: {e}") from None
    worker: int | None = None
    duration_s: float | None = None
    seen: set[str] = set()
    for option in options:
        key, eq, value = (part.strip() for part in option.partition("="))
        if not eq or not value:
            raise ValueError(f"bad fault {text!r}: option {option!r} is not KEY=VALUE")
        if key in seen:
            raise ValueError(f"bad fault {text!r}: {key} given twice")
        seen.add(key)
        if key == "worker":
            if not value.isdecimal():
                raise ValueError(f"bad fault {text!r}: worker must be an integer worker id, got {value!r}")
            worker = int(value)
        elif key == "duration":
            try:
                duration_s = parse_time_s(value)
            except ValueError as e:
                raise ValueError(f"bad fault {text!r}: duration: {e}") from None
            if duration_s <= 0:
                raise ValueError(f"bad fault {text!r}: duration must be > 0")
        else:
            raise ValueError(f"bad fault {text!r}: unknown option {key!r} (worker, duration)")
    return FaultSpec(kind, at_s, worker, duration_s)


def read_admin_token(path: str | Path | None = None) -> str:
    """The daemon's generated admin token from its owner-only file (default
    ~/.local/state/kevlard/admin_token); BenchError when there is none."""
    if path is None:
        from kevlard.admin_token import TOKEN_FILE_NAME, default_state_dir

        path = default_state_dir() / TOKEN_FILE_NAME
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"faults need the admin token: pass --admin-token, or let the daemon write "
                         f"{path} ({e.strerror if isinstance(e, OSError) else e})") from e
    if not token:
        raise BenchError(f"faults need the admin token: {path} is empty")
    return token


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
    if faults and not admin_token:
        admin_token = read_admin_token()
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
        finally:
            for task in [*tasks, *fault_tasks]:
                task.cancel()
            await admin.aclose()
    return result


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


async def pick_worker(admin: httpx.AsyncClient, base: str, stage: int | None) -> tuple[int, int]:
    """(worker id, stage) of pipeline 0's route in GET /api/cluster; stage None: the middle one."""
    target = f"{base}/api/cluster"
    response = await admin.get(target)
    if response.is_error:
        raise BenchError(f"GET {target} answered {response.status_code}: {response.text[:MAX_ERROR_CHARS]}")
    try:
        pipelines = response.json()["pipelines"]
        pipeline = next(p for p in pipelines if p.get("id") == 0) if isinstance(pipelines, list) else None
        route = list(pipeline["route"]) if pipeline else None
    except (ValueError, KeyError, TypeError, StopIteration):
        route = None
    if not route:
        raise BenchError(f"GET {target} names no route of pipeline 0: {response.text[:MAX_ERROR_CHARS]!r}")
    index = len(route) // 2 if stage is None else stage
    if not -len(route) <= index < len(route):
        raise BenchError(f"pipeline 0 has {len(route)} stages, no stage {stage}")
    index %= len(route)
    return int(route[index]), index


async def _inject(admin: httpx.AsyncClient, base: str, spec: FaultSpec, stage: int | None,
                  start: float, model: str | None = None) -> FaultRecord:
    """Wait for spec.at_s, pick the worker if the spec names none, post the fault."""
    def now() -> float:
        return time.perf_counter() - start

    delay = spec.at_s - now()
    if delay > 0:
        await asyncio.sleep(delay)
    worker, picked_stage = spec.worker, None
    injected_s = acked_s = status_code = probe_first_token_s = None
    error: str | None = None
    try:
        if worker is None:
            worker, picked_stage = await pick_worker(admin, base, stage)
        body: dict[str, Any] = {"worker": worker, "kind": spec.kind}
        if spec.duration_s is not None:
            body["duration_s"] = spec.duration_s
        injected_s = now()
        response = await admin.post(f"{base}/api/faults", json=body)
        acked_s = now()
        status_code = response.status_code
        if response.is_error:
            error = f"POST /api/faults answered {status_code}: {response.text[:MAX_ERROR_CHARS]}"
        else:
            probe_s = await _probe_first_token(admin, base, model)
            probe_first_token_s = None if probe_s is None else probe_s - start - injected_s
    except BenchError as e:
        error = str(e)
    except Exception as e:  # a fault that cannot be posted is reported, the load goes on
        error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    return FaultRecord(kind=spec.kind, at_s=spec.at_s, worker=worker, stage=picked_stage,
                       duration_s=spec.duration_s, injected_s=injected_s, acked_s=acked_s,
                       ok=error is None, status_code=status_code, error=error,
                       probe_first_token_s=probe_first_token_s)


async def _probe_first_token(client: httpx.AsyncClient, base: str, model: str | None) -> float | None:
    """Send one small streamed request now; the perf_counter time of its first token, or None."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 2,
                            "stream": True}
    if model:
        body["model"] = model
    try:
        async with asyncio.timeout(120):
            async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
                if response.is_error:
                    return None
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    choices = json.loads(line[len("data:"):]).get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        return time.perf_counter()
    except Exception:
        return None
    return None


async def _collect_faults(specs: Sequence[FaultSpec], tasks: Sequence[asyncio.Task[FaultRecord]],
                          start: float) -> list[FaultRecord]:
    """The fault records once every request finished: a fault whose time has come is awaited,
    one still waiting for its time is cancelled (the run ended before it)."""
    records = []
    for spec, task in zip(specs, tasks):
        if not task.done() and spec.at_s > time.perf_counter() - start:
            task.cancel()
            records.append(FaultRecord(kind=spec.kind, at_s=spec.at_s, worker=spec.worker,
                                       duration_s=spec.duration_s,
                                       error="every request finished before its time came"))
        else:
            records.append(await task)
    return records


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
