"""The fault schedule of `kevlard bench`: `--fault KIND@TIME[:worker=ID][:duration=TIME]` specs,
and their injection through the daemon's `POST /api/faults` while the load goes on.

`kill@TIME:pidfile=PATH` instead SIGKILLs, on this machine, the process whose pid PATH holds at
that moment: the same fault for a server without /api/faults (the peer under a supervisor that
restarts it, as systemd would). Its probe request is retried until the server answers again.

Each fault waits for its time from the start of the run, picks its worker from GET /api/cluster
if the spec names none, posts the fault and at the same moment sends one probe request, whose
first token it times; report.py turns the resulting records into recovery metrics.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import httpx

from kevlard.bench.errors import MAX_ERROR_CHARS, BenchError
from kevlard.bench.report import FaultRecord
from kevlard.messages import FAULT_KINDS  # what POST /api/faults accepts

ADMIN_TIMEOUT_S = 10.0  # GET /api/cluster and POST /api/faults, each


@dataclass(frozen=True)
class FaultSpec:
    """One `--fault KIND@TIME[:worker=ID][:duration=TIME]`."""

    kind: str
    at_s: float
    worker: int | None = None  # None: the worker of --fault-stage of pipeline 0 at injection
    duration_s: float | None = None  # for hang/slow; None: the server's default
    pidfile: str | None = None  # kill the process this file names (a server without /api/faults)

    def __str__(self) -> str:
        text = f"{self.kind}@{self.at_s:g}s"
        if self.worker is not None:
            text += f":worker={self.worker}"
        if self.duration_s is not None:
            text += f":duration={self.duration_s:g}s"
        if self.pidfile is not None:
            text += f":pidfile={self.pidfile}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "at_s": self.at_s, "worker": self.worker, "duration_s": self.duration_s,
                "pidfile": self.pidfile}


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
    pidfile: str | None = None
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
        elif key == "pidfile":
            pidfile = value
        else:
            raise ValueError(f"bad fault {text!r}: unknown option {key!r} (worker, duration, pidfile)")
    if pidfile is not None and (kind != "kill" or worker is not None or duration_s is not None):
        raise ValueError(f"bad fault {text!r}: pidfile goes with kill alone (a SIGKILL of that process)")
    return FaultSpec(kind, at_s, worker, duration_s, pidfile)

def read_admin_token(url: str, path: str | Path | None = None) -> str:
    """The generated admin token of the daemon at `url`, from its owner-only file (default
    ~/.local/state/kevlard/admin_token.<port of url>); BenchError when there is none."""
    if path is None:
        from kevlard.admin_token import token_file_for_url

        try:
            path = token_file_for_url(url)
        except ValueError as e:
            raise BenchError(str(e)) from None
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"faults need the admin token: pass --admin-token, or let the daemon write "
                         f"{path} ({e.strerror if isinstance(e, OSError) else e})") from e
    if not token:
        raise BenchError(f"faults need the admin token: {path} is empty")
    return token

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
    if spec.pidfile is not None:
        return await _kill_process(admin, base, spec, start, model)
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
        # the probe is a request sent at the moment of the fault, not once the admin call is
        # answered (that answer alone took 45-52 ms under the benchmark's load on 2 cores)
        probe = asyncio.ensure_future(_probe_first_token(admin, base, model))
        try:
            response = await admin.post(f"{base}/api/faults", json=body)
        except BaseException:
            probe.cancel()
            raise
        acked_s = now()
        status_code = response.status_code
        if response.is_error:
            probe.cancel()
            error = f"POST /api/faults answered {status_code}: {response.text[:MAX_ERROR_CHARS]}"
        else:
            probe_s = await probe
            probe_first_token_s = None if probe_s is None else probe_s - start - injected_s
    except BenchError as e:
        error = str(e)
    except Exception as e:  # a fault that cannot be posted is reported, the load goes on
        error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    return FaultRecord(kind=spec.kind, at_s=spec.at_s, worker=worker, stage=picked_stage,
                       duration_s=spec.duration_s, injected_s=injected_s, acked_s=acked_s,
                       ok=error is None, status_code=status_code, error=error,
                       probe_first_token_s=probe_first_token_s)


async def _kill_process(admin: httpx.AsyncClient, base: str, spec: FaultSpec, start: float,
                        model: str | None) -> FaultRecord:
    """SIGKILL the process spec.pidfile names, then time a probe retried until the server is back."""
    injected_s = probe_first_token_s = pid = None
    error: str | None = None
    try:
        pid = int(Path(spec.pidfile).read_text().strip())
        injected_s = time.perf_counter() - start
        os.kill(pid, signal.SIGKILL)
        probe_s = await _probe_first_token(admin, base, model, retry_until_s=PROBE_RETRY_S)
        probe_first_token_s = None if probe_s is None else probe_s - start - injected_s
    except (OSError, ValueError) as e:
        error = f"cannot kill the process of {spec.pidfile}: {e}"[:MAX_ERROR_CHARS]
    return FaultRecord(kind=spec.kind, at_s=spec.at_s, worker=pid, stage=None, duration_s=None,
                       injected_s=injected_s, acked_s=injected_s, ok=error is None, status_code=None,
                       error=error, probe_first_token_s=probe_first_token_s)


PROBE_RETRY_S = 300.0  # how long a probe keeps trying a server that is restarting
PROBE_RETRY_EVERY_S = 0.1
PROBE_TIMEOUT_S = 300.0  # one probe request, waiting out a (possibly emulated) reload; not the admin calls' 10 s


async def _probe_first_token(client: httpx.AsyncClient, base: str, model: str | None,
                             retry_until_s: float = 0.0) -> float | None:
    """Send one small streamed request now; the perf_counter time of its first token, or None.
    With `retry_until_s`, a refused connection or an error status is retried that long."""
    # greedy and a few tokens: a random test model's first token or two may carry no visible text
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 8,
                            "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    give_up = time.perf_counter() + retry_until_s
    while True:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async with client.stream("POST", f"{base}/v1/chat/completions", json=body,
                                         timeout=PROBE_TIMEOUT_S) as response:
                    if not response.is_error:
                        async for line in response.aiter_lines():
                            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                                continue
                            choices = json.loads(line[len("data:"):]).get("choices") or [{}]
                            if (choices[0].get("delta") or {}).get("content"):
                                return time.perf_counter()
        except Exception:
            pass
        if time.perf_counter() >= give_up:
            return None
        await asyncio.sleep(PROBE_RETRY_EVERY_S)


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
