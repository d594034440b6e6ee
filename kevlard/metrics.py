"""Prometheus metrics for `GET /metrics`: vLLM's names, so existing dashboards work, and kevlard's own.

Three feeds, each where the fact is known:
- request counters and histograms: `engine.generate` reports each request through `track()`;
- failures, reroutes, rehosts, recovery times, resumed requests: the engine's event log;
- gauges (queues, KV usage, worker liveness, replication lag): `engine.snapshot()` at scrape time,
  so a scrape never shows a stale value.
Everything lives on its own `CollectorRegistry`, not the process-global one.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from kevlard.events import Event, EventLog

log = logging.getLogger("kevlard.metrics")

# text format 0.0.4 is what generate_latest writes, and what every Prometheus version reads
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (v1 engine), so histograms line up with dashboards built for it
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
RECOVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

FINISH_REASONS = ("stop", "length", "abort")
FAILURE_KINDS = ("kill", "hang", "device_error")
RESUME_HOWS = ("replica", "replay")
UP_STATES = ("healthy", "spare", "rehosting")  # a live process that serves or can serve


class Metrics:
    def __init__(self, model_name: str, snapshot: Callable[[], dict] | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, model = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     model, registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         model, registry=r).labels(model_name)
        self.prefix_cache_queries = Counter("vllm:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.",
                                            model, registry=r).labels(model_name)
        self.prefix_cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                         model, registry=r).labels(model_name)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              model, buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             model, buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", model, buckets=E2E_BUCKETS,
                             registry=r).labels(model_name)
        self.failures = Counter("kevlard_failures", "Worker failures, by kind (kill, hang, device_error, ...).",
                                ["kind"], registry=r)
        self.reroutes = Counter("kevlard_reroutes", "Pipelines rerouted through a buddy after a failure.",
                                registry=r)
        self.rehosts = Counter("kevlard_rehosts", "Stages rehosted on a spare, restoring capacity.", registry=r)
        self.recovery_seconds = Histogram(
            "kevlard_recovery_seconds", "From a failure until its pipeline serves again (rerouted, or "
            "restored when no buddy could take over).", buckets=RECOVERY_BUCKETS, registry=r)
        self.requests_resumed = Counter(
            "kevlard_requests_resumed", "Requests moved off a failed worker: resumed from the KV replica, "
            "or replayed from prompt and tokens so far.", ["how"], registry=r)
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name, reason)
        for kind in FAILURE_KINDS:
            self.failures.labels(kind)
        for how in RESUME_HOWS:
            self.requests_resumed.labels(how)
        if snapshot is not None:
            r.register(_SnapshotCollector(model_name, snapshot))
        self._down: set[int] = set()  # pipelines down without a reroute, until restored

    # ---------------------------------------------------------------- feeds

    def track(self, arrival: float, num_prompt_tokens: int) -> RequestMetrics:
        """A request accepted at `arrival` (time.monotonic()); report its tokens to what this returns."""
        return RequestMetrics(self, arrival, num_prompt_tokens)

    def on_event(self, event: Event) -> None:
        data = event.data
        if event.kind == "worker_state" and data.get("state") == "dead":
            self.failures.labels(data.get("reason") or "unknown").inc()
        elif event.kind == "reroute":
            self.reroutes.inc()
            self.recovery_seconds.observe(float(data.get("seconds", 0.0)))
        elif event.kind in ("pipeline_down", "restart"):
            self._down.add(data.get("pipeline"))
            self.requests_resumed.labels("replay").inc(int(data.get("requests_replayed") or 0))
        elif event.kind == "restore":
            if data.get("how") != "restart":
                self.rehosts.inc()
            if data.get("pipeline") in self._down:
                self._down.discard(data.get("pipeline"))
                self.recovery_seconds.observe(float(data.get("since_failure_s", 0.0)))
        elif event.kind == "request_resumed":
            self.requests_resumed.labels(str(data.get("how", "replay"))).inc()

    async def follow(self, events: EventLog) -> None:
        """Count events as they come, until cancelled."""
        queue = events.subscribe()
        try:
            while True:
                event = await queue.get()
                try:
                    self.on_event(event)
                except Exception:  # a malformed event must not stop the counting
                    log.exception("cannot count event %s", event.kind)
        finally:
            events.unsubscribe(queue)

    def render(self) -> bytes:
        """The text exposition; gauges are read from the engine now."""
        return generate_latest(self.registry)


class RequestMetrics:
    """One request's timings, taken as the engine hands tokens to the web layer. A delta of n
    tokens that queued up spreads its gap since the previous delta evenly over them (vLLM sees
    one token per step); tokens that came with the first one have no gap to measure."""

    __slots__ = ("_arrival", "_finished", "_last", "_m", "_num_prompt")

    def __init__(self, metrics: Metrics, arrival: float, num_prompt_tokens: int) -> None:
        self._m = metrics
        self._arrival = arrival
        self._num_prompt = num_prompt_tokens
        self._last: float | None = None
        self._finished = False

    def tokens(self, n: int, finish_reason: str | None = None, cached_tokens: int | None = None) -> None:
        now = time.monotonic()
        m = self._m
        if n > 0:
            if self._last is None:
                m.ttft.observe(now - self._arrival)
                m.prompt_tokens.inc(self._num_prompt)
                m.prefix_cache_queries.inc(self._num_prompt)
                m.prefix_cache_hits.inc(cached_tokens or 0)
            else:
                for _ in range(n):
                    m.itl.observe((now - self._last) / n)
            self._last = now
            m.generation_tokens.inc(n)
        if finish_reason is not None and not self._finished:
            self._finish(finish_reason, now)

    def close(self) -> None:
        """The request ends here; without a finish reason so far it was aborted."""
        if not self._finished:
            self._finish("abort", time.monotonic())

    def _finish(self, reason: str, now: float) -> None:
        self._finished = True
        self._m.request_success.labels(self._m.model_name, reason).inc()
        self._m.e2e.observe(now - self._arrival)


class _SnapshotCollector:
    """Gauges read from `engine.snapshot()` at each scrape."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict]) -> None:
        self._model = model_name
        self._snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            snap = self._snapshot()
        except Exception:  # a scrape still answers with the counters
            log.exception("engine.snapshot() failed during a scrape")
            return
        model = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(model, float(value))
            return g

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    snap.get("num_running", 0))
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    snap.get("num_waiting", 0))
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    snap.get("kv_usage", 0.0))
        up = GaugeMetricFamily("kevlard_worker_up", "1 while the worker process serves or stands by "
                               "(healthy, spare, rehosting), else 0.", labels=["worker", "device"])
        for w in snap.get("workers", []):
            up.add_metric([str(w["id"]), str(w.get("device", ""))], 1.0 if w.get("state") in UP_STATES else 0.0)
        yield up
        yield GaugeMetricFamily("kevlard_kv_replication_lag_tokens", "Tokens computed but not yet "
                                "replicated to the buddy, over running requests and stages.",
                                value=float(snap.get("replica_lag_tokens", 0)))


def attach(engine) -> asyncio.Task:
    """Give `engine` its metrics (`engine.metrics`) and start counting its events; returns the
    task that counts them, to cancel at shutdown. Call on the engine's event loop."""
    engine.metrics = Metrics(engine.model_name, engine.snapshot)
    return asyncio.get_running_loop().create_task(engine.metrics.follow(engine.events))
