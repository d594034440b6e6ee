"""`kevlard serve`: load the model once, spawn the workers, run the engine and the web app.

Start-up order: clean stale shared memory of dead daemons, resolve the model (a GGUF is
converted once to a safetensors cache), load the weights into the host weight store, spawn the
workers and host the stages, open the links, then serve HTTP. SIGTERM/SIGINT: stop accepting,
let in-flight requests finish within `server.drain_timeout_s`, stop the workers, free the store.

Exit codes: 0 after SIGTERM/SIGINT, 1 when start-up fails, 2 for an invalid configuration (a
public bind without both tokens included), 3 when no route has existed for
`scheduler.no_route_wait_s` and nothing can restore one. Under systemd it notifies
$NOTIFY_SOCKET (kevlard.systemd).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import time

from kevlard.config import Config, ConfigError, check_exposure
from kevlard.logs import setup_logging

log = logging.getLogger("kevlard")


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code."""
    setup_logging(config.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from kevlard.systemd import Notifier

        # taken before any worker starts: none of them inherits the service's notify socket
        return asyncio.run(_serve(config, Notifier(unset_environment=True)))
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.info("start-up interrupted")
        return 0
    except Exception as e:  # start-up failures: a clear line, a non-zero exit for systemd
        from kevlard.cluster import WorkerStartError
        from kevlard.model_source import UnsupportedModelError

        if isinstance(e, (UnsupportedModelError, WorkerStartError, OSError, ValueError)):  # disk, paths
            log.error("cannot start: %s", e)
            return 1
        raise


def _cuda_count(devices: str) -> int:
    """Visible GPUs; without importing torch (a second of the cold start) where there can be none."""
    if devices.startswith("cpu") or not (os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia")):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _on_signals(handler) -> None:
    """SIGTERM (systemd's stop), SIGINT (Ctrl-C) and SIGHUP (the terminal or ssh session closed; there
    is no configuration reload) each drain and stop; a second one stops at once."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, handler)


# After the drain timeout the requests still running end with a shutting-down error; uvicorn waits
# this much longer for their streams to say so and close before it cancels them.
STREAM_END_GRACE_S = 2.0


async def _end_streams_after(engine, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await engine.drain(0.0)


def _listen(server) -> socket.socket:
    """A socket listening on server.host:server.port (uvicorn accepts on it once the daemon is
    ready; a connection made meanwhile waits in the backlog). Listening at once holds the port:
    bound but not listening, a second daemon could bind it too (both with SO_REUSEADDR), load a
    model, write its admin token over the first one's file, and only then fail."""
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((server.host, server.port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"server.port: cannot listen on {server.host}:{server.port}: {e.strerror or e}") from e
    return sock


async def _serve(config: Config, notifier) -> int:
    t0 = time.monotonic()
    check_exposure(config.server)  # before anything starts: a ConfigError exits 2
    # the HTTP port is taken first: a port in use fails at once, and no socket the workers and
    # their links open (ephemeral ports) can take it while the model loads
    listener = _listen(config.server)
    _on_signals(asyncio.current_task().cancel)  # during start-up: stop, clean up, exit
    from kevlard.cluster import Cluster, pipeline_cpu_sets
    from kevlard.gpu.weight_store import cleanup_stale_segments
    from kevlard.launcher import LocalLauncher
    from kevlard.topology import plan_topology

    removed = cleanup_stale_segments()
    if removed:
        log.info("removed %d stale shared-memory segment(s) of dead daemons: %s", len(removed), ", ".join(removed))
    topo = plan_topology(config.cluster, _cuda_count(config.cluster.devices))
    # the workers import torch while the daemon loads the model
    threads = config.cluster.threads_per_worker or max(1, (os.cpu_count() or 1) // (topo.pipelines * topo.stages))
    replication = config.kv.replication and config.recovery == "kevlar" and topo.pipelines > 1
    cluster = Cluster(topo, LocalLauncher(config.health.heartbeat_interval_s, config.log_format),
                      config.cluster.link_timeout_s, config.cluster.worker_start_timeout_s, threads, replication)
    if config.cluster.cpu_budget == "pipeline" and topo.kind == "cpu":
        cluster.cpu_sets = pipeline_cpu_sets(topo.pipelines, sorted(os.sched_getaffinity(0)))
        log.info("cpu_budget = pipeline: pipelines pinned to cores %s", [sorted(c) for c in cluster.cpu_sets])
    cluster.spawning = asyncio.ensure_future(cluster.spawn_pipeline_workers())
    try:
        return await _load_and_serve(config, topo, cluster, t0, listener, notifier)
    finally:
        with contextlib.suppress(BaseException):  # started workers are registered, then stopped
            await cluster.spawning
        await asyncio.to_thread(cluster.stop)


async def _load_and_serve(config: Config, topo, cluster, t0: float, listener: socket.socket, notifier) -> int:
    from kevlard.engine import KevlarEngine
    from kevlard.gpu.kv_cache import bytes_per_block
    from kevlard.gpu.weight_store import HostWeightStore
    from kevlard.messages import HostStage, PrepareKV
    from kevlard.model_source import resolve_model
    from kevlard.recovery import Recovery
    from kevlard.topology import split_layers

    source = await asyncio.to_thread(resolve_model, config.model.path, config.model.cache_dir,
                                     config.model.dtype, lambda msg: log.info("%s", msg))
    spec = source.spec
    tokenizer = await asyncio.to_thread(source.load_tokenizer)
    layer_params = (spec.hidden_size * spec.head_dim * (2 * spec.num_heads + 2 * spec.num_kv_heads)
                    + 3 * spec.hidden_size * spec.intermediate_size)
    # the head runs only for sampled rows: about a quarter of the rows under a prompt-heavy prefill/decode load
    head_cost = 0.25 * spec.vocab_size * spec.hidden_size / layer_params
    bounds = split_layers(spec.num_layers, topo.stages, head_cost)
    max_model_len = config.model.max_model_len or min(spec.max_position_embeddings, 8192)
    log.info("model %s: %d layers, hidden %d; %d pipeline(s) x %d stage(s) %s, %d spare(s), on %s",
             source.name, spec.num_layers, spec.hidden_size, topo.pipelines, topo.stages,
             [f"{a}-{b - 1}" for a, b in bounds], topo.spares, topo.kind)

    creating = asyncio.ensure_future(asyncio.to_thread(
        HostWeightStore.create, source, config.model.dtype, "", packed_cache=_packed_cache(config, topo, source),
        log=lambda msg: log.info("%s", msg)))
    try:
        store = await asyncio.shield(creating)
    except asyncio.CancelledError:  # SIGTERM while copying: let the copy end, then free the segment
        (await creating).close()
        raise
    try:
        log.info("host weight store: %.1f MB in %s%s", store.nbytes / 2 ** 20, store.path,
                 f", {store.packed_bytes / 2 ** 20:.1f} MB of packed linear layers" if store.packed_bytes else "")
        kv_dtype_size = 4 if config.model.dtype in ("float16", "bfloat16") else 8  # gpu/kv_cache.attention_dtype
        max_layers = max(b - a for a, b in bounds)
        per_block = bytes_per_block(max_layers, config.kv.block_size, spec.num_kv_heads, spec.head_dim, kv_dtype_size)
        # with replication, kv.replica_fraction of the memory is a replica pool for the buddy's stage;
        # it holds the buddy's block ids below its size, so it is never larger than the pipeline's pool
        share = 1.0 - config.kv.replica_fraction if cluster.replication else 1.0
        num_blocks = config.kv.num_blocks or max(1, int(config.kv.memory_mb * 2 ** 20 * share) // per_block)
        replica_blocks = min(num_blocks, max(1, round(num_blocks * config.kv.replica_fraction / share))) \
            if cluster.replication else 0

        def stage_command(s: int, replica_pool: bool = cluster.replication, from_disk: bool = False) -> HostStage:
            first, last = bounds[s]
            is_first, is_last = s == 0, s == topo.stages - 1
            return HostStage(cluster.next_cmd_id(), s, first, last, is_first, is_last,
                             store.stage_handle(first, last, is_first, is_last), spec, num_blocks,
                             config.kv.block_size, config.model.dtype, replica_blocks if replica_pool else 0,
                             str(source.weights_dir) if from_disk else None,
                             replication_interval_s=config.kv.replication_interval_ms / 1000)

        cluster.prepare_command = lambda: PrepareKV(cluster.next_cmd_id(), max_layers, num_blocks, replica_blocks,
                                                    config.kv.block_size, spec.num_kv_heads, spec.head_dim,
                                                    config.model.dtype)
        await cluster.start(stage_command)
        # one request must fit in one pipeline's KV blocks
        max_model_len = min(max_model_len, num_blocks * config.kv.block_size)
        engine = KevlarEngine(config, source, tokenizer, cluster, num_blocks, max_model_len)
        engine.replica_blocks = replica_blocks or num_blocks
        engine.recovery = Recovery(engine, stage_command, str(source.weights_dir))
        engine.start_background()
        log.info("%d pipeline workers up, %d KV blocks of %d tokens per worker (and %d in a replica pool), "
                 "%d thread(s) each", topo.pipelines * topo.stages, num_blocks, config.kv.block_size,
                 replica_blocks, cluster.threads_per_worker)
        return await _run_http(config, engine, t0, cluster.start_spares, listener, notifier)
    finally:
        store.close()
        log.info("stopped")


def _packed_cache(config: Config, topo, source):
    """Where the store keeps the linear layers packed for oneDNN (CPU workers, float32), or False
    when the workers use plain weights (GPUs, half precision, or a torch that cannot share them)."""
    import hashlib
    from pathlib import Path

    from kevlard.gpu import packed
    from kevlard.model_source import DEFAULT_CACHE_DIR

    if topo.kind != "cpu" or config.model.dtype != "float32" or not packed.supported():
        return False
    key = hashlib.sha256(str(source.weights_dir.resolve()).encode()).hexdigest()[:24]
    return Path(config.model.cache_dir or DEFAULT_CACHE_DIR).expanduser() / "packed" / key


async def _run_http(config: Config, engine, t0: float, after_ready, listener: socket.socket, notifier) -> int:
    import uvicorn

    from kevlard import metrics, systemd
    from kevlard.admin_token import new_admin_token, remove_token_file, resolve_admin_token
    from kevlard.logs import announce
    from kevlard.web.app import close_streams, create_app
    from kevlard.web.ops_api import metrics_route

    unwritten = None
    try:
        admin_token, token_file = resolve_admin_token(config.server.admin_token, listener.getsockname()[1])
    except OSError as e:  # a read-only or full home: serve all the same, the token is printed below
        admin_token, token_file, unwritten = new_admin_token(), None, e
    counting = metrics.attach(engine)
    app = create_app(engine, config, admin_token=admin_token, extra_routes=[metrics_route(engine.metrics)])
    exit_code = 0
    server = uvicorn.Server(uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                           log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=math.ceil(config.server.drain_timeout_s
                                                                               + STREAM_END_GRACE_S)))
    server.capture_signals = contextlib.nullcontext  # ours below: drain and exit 0, not re-raise
    task = asyncio.create_task(server.serve(sockets=[listener]))

    def status() -> str:
        return "stopping: draining in-flight requests" if server.should_exit else \
            systemd.status_line(engine.snapshot())

    ending: list[asyncio.Task] = []

    def stop() -> None:
        if server.should_exit:
            server.force_exit = True  # a second signal: do not wait for the drain
        else:  # past the drain timeout, what still runs ends with an error event, not a cut connection
            ending.append(asyncio.ensure_future(_end_streams_after(engine, config.server.drain_timeout_s)))
        server.should_exit = True
        engine.begin_shutdown()  # /ready says 503 while in-flight requests drain
        close_streams(app)  # open /api/events streams must not hold the shutdown
        notifier.notify("STOPPING=1", f"STATUS={status()}")
        log.info("shutting down: no new connections, draining in-flight requests")

    def unrecoverable() -> None:
        nonlocal exit_code
        exit_code = 3  # non-zero: systemd's Restart=on-failure starts a fresh daemon
        stop()

    _on_signals(stop)
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if task.done():
        remove_token_file(token_file, admin_token)
        task.result()  # raises the error
        return 1
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    log.info("ready in %.1f s: serving %s on http://%s:%d", time.monotonic() - t0, engine.model_name, host, port)
    announce(config.log_format, f"kevlard: serving {engine.model_name} on http://{host}:{port}")
    if token_file is not None:
        announce(config.log_format, f"kevlard: admin token written to {token_file} (owner-only); dashboard: "
                                    f"http://{host}:{port}/?token={admin_token}")
    elif unwritten is not None:
        log.warning("cannot write the admin token file (%s); the token is only in the dashboard link below",
                    unwritten)
        announce(config.log_format, f"kevlard: dashboard: http://{host}:{port}/?token={admin_token}")
    notifier.notify("READY=1", f"STATUS={status()}")
    watches = [asyncio.create_task(after_ready()), counting, asyncio.create_task(notifier.watchdog(status)),
               asyncio.create_task(_watch_capacity(engine, config.scheduler.no_route_wait_s, unrecoverable))]
    await task
    for watch in watches + ending:
        watch.cancel()
    remove_token_file(token_file, admin_token)
    await engine.drain(0.0)
    notifier.close()
    return exit_code


async def _watch_capacity(engine, grace_s: float, on_lost, poll_s: float = 0.5) -> None:
    """Call `on_lost` once no complete route has existed for `grace_s` and nothing can bring one
    back. Conservative: never while a recovery task (reroute, restore, restart, replacement
    spare) is under way, since each of those ends within `cluster.worker_start_timeout_s`; and a
    worker starting or standing by as a spare gets that long again to be put to use."""
    from kevlard.systemd import status_line

    cluster = engine.cluster
    no_route_since = None
    while True:
        await asyncio.sleep(poll_s)
        if any(cluster.route_alive(p) for p in range(len(cluster.routes))):
            no_route_since = None
            continue
        now = time.monotonic()
        no_route_since = no_route_since or now
        down_for = now - no_route_since
        if down_for < grace_s or (engine.recovery is not None and engine.recovery.busy):
            continue
        if (down_for < grace_s + cluster.start_timeout_s
                and any(w.state in ("starting", "spare", "rehosting") for w in cluster.workers.values())):
            continue
        log.error("cannot serve: no complete pipeline route for %.0f s and nothing left to restore one "
                  "(%s); exiting with code 3", down_for, status_line(engine.snapshot()))
        on_lost()
        return
