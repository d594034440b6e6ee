"""kevlard's configuration: frozen dataclasses loaded from `kevlard.toml`, validated once.

Every field has a default so `kevlard serve` runs with no file. CLI flags override the file.
Errors name the offending field (`ConfigError("cluster.pipelines: must be >= 1, got 0")`).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Invalid configuration; the message names the field."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # empty: /v1/* is open
    admin_token: str = ""  # empty: generated at start
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int = 0  # 0: the model's context length
    max_tokens_limit: int = 4096  # upper bound on a request's max_tokens
    default_max_tokens: int = 256


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # a HF directory or a .gguf file; empty: the embedded SmolLM2-135M-Instruct
    name: str = ""  # id served by /v1/models; empty: derived from the path
    dtype: str = "float32"  # float32 | bfloat16 | float16
    cache_dir: str = ""  # GGUF conversions and (CPU) packed linear layers; empty: ~/.cache/kevlard
    max_model_len: int = 0  # 0: the model's max_position_embeddings (capped at 8192)


@dataclass(frozen=True)
class ClusterConfig:
    devices: str = "auto"  # auto | cpu:N | cuda:0,1,...
    pipelines: int = 0  # 0: derived (2 when there are >= 4 devices, else 1)
    stages: int = 0  # 0: derived (devices // pipelines)
    spares: int = -1  # -1: derived (1 if a device is left over or on CPU, else 0)
    worker_start_timeout_s: float = 120.0
    restart_reload_extra_s: float = 0.0  # recovery = "restart" only: added to each reload (emulates a bigger model)
    link_timeout_s: float = 30.0  # every send/recv on a link
    threads_per_worker: int = 0  # 0: cores divided among active workers
    cpu_budget: str = "shared"  # virtual CPU devices: shared | pipeline (each pipeline pinned to its own cores)

    @property
    def device_kind(self) -> str:
        return self.devices.split(":", 1)[0]


@dataclass(frozen=True)
class KVConfig:
    block_size: int = 16
    num_blocks: int = 0  # per worker; 0: derived from memory_mb
    memory_mb: int = 256  # per worker, when num_blocks is 0
    replication: bool = True
    replica_fraction: float = 0.5
    replication_interval_ms: int = 1000  # at most this long between shipments to the buddy
    prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 256  # token budget of one micro-batch (prefill chunks + decodes)
    max_running: int = 32  # per pipeline
    max_waiting: int = 256  # beyond this, new requests get 429
    microbatches: int = 0  # in flight per pipeline; 0: one per stage
    step_timeout_s: float = 30.0
    no_route_wait_s: float = 30.0


@dataclass(frozen=True)
class HealthConfig:
    heartbeat_interval_s: float = 0.1
    heartbeat_timeout_s: float = 1.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    recovery: str = "kevlar"  # kevlar | restart
    log_format: str = "text"  # text | json

    def validate(self) -> "Config":
        _check(1 <= self.server.port <= 65535, "server.port", "must be in 1..65535", self.server.port)
        _check(self.server.drain_timeout_s >= 0, "server.drain_timeout_s", "must be >= 0",
               self.server.drain_timeout_s)
        _check(self.server.max_tokens_limit >= 1, "server.max_tokens_limit", "must be >= 1",
               self.server.max_tokens_limit)
        _check(self.server.default_max_tokens >= 1, "server.default_max_tokens", "must be >= 1",
               self.server.default_max_tokens)
        _check(self.server.max_body_bytes >= 1024, "server.max_body_bytes", "must be >= 1024",
               self.server.max_body_bytes)
        _check(self.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
               "must be float32, bfloat16 or float16", self.model.dtype)
        if self.model.path:
            _check(Path(self.model.path).expanduser().exists(), "model.path", "does not exist",
                   self.model.path)
        if self.model.cache_dir:
            cache = Path(self.model.cache_dir).expanduser()
            _check(not cache.exists() or cache.is_dir(), "model.cache_dir", "is not a directory",
                   self.model.cache_dir)
        parse_devices(self.cluster.devices)  # raises ConfigError naming cluster.devices
        _check(self.cluster.pipelines >= 0, "cluster.pipelines", "must be >= 1 (or 0 to derive)",
               self.cluster.pipelines)
        _check(self.cluster.stages >= 0, "cluster.stages", "must be >= 1 (or 0 to derive)", self.cluster.stages)
        _check(self.cluster.spares >= -1, "cluster.spares", "must be >= 0 (or -1 to derive)", self.cluster.spares)
        _check(self.cluster.restart_reload_extra_s >= 0, "cluster.restart_reload_extra_s", "must be >= 0",
               self.cluster.restart_reload_extra_s)
        _check(self.cluster.worker_start_timeout_s > 0, "cluster.worker_start_timeout_s", "must be > 0",
               self.cluster.worker_start_timeout_s)
        _check(self.cluster.link_timeout_s > 0, "cluster.link_timeout_s", "must be > 0",
               self.cluster.link_timeout_s)
        _check(self.cluster.cpu_budget in ("shared", "pipeline"), "cluster.cpu_budget", "must be shared or pipeline",
               self.cluster.cpu_budget)
        _check(self.cluster.threads_per_worker >= 0, "cluster.threads_per_worker", "must be >= 0",
               self.cluster.threads_per_worker)
        _check(self.scheduler.microbatches >= 0, "scheduler.microbatches", "must be >= 0",
               self.scheduler.microbatches)
        _check(self.scheduler.step_timeout_s > 0, "scheduler.step_timeout_s", "must be > 0",
               self.scheduler.step_timeout_s)
        _check(self.scheduler.no_route_wait_s >= 0, "scheduler.no_route_wait_s", "must be >= 0",
               self.scheduler.no_route_wait_s)
        _check(self.server.max_prompt_tokens >= 0, "server.max_prompt_tokens", "must be >= 0",
               self.server.max_prompt_tokens)
        _check(self.model.max_model_len >= 0, "model.max_model_len", "must be >= 0", self.model.max_model_len)
        _check(bool(self.server.host.strip()), "server.host", "must not be empty", self.server.host)
        _check(self.server.default_max_tokens <= self.server.max_tokens_limit, "server.default_max_tokens",
               "must not exceed server.max_tokens_limit", self.server.default_max_tokens)
        _check(self.kv.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "kv.block_size",
               "must be a power of two in 1..128", self.kv.block_size)
        _check(0 <= self.kv.num_blocks <= 1 << 30, "kv.num_blocks", "must be in 0..2^30", self.kv.num_blocks)
        _check(1 <= self.kv.memory_mb <= 1 << 24, "kv.memory_mb", "must be in 1..16777216 (16 TiB)", self.kv.memory_mb)
        _check(0.0 <= self.kv.replica_fraction < 1.0, "kv.replica_fraction", "must be in [0, 1)",
               self.kv.replica_fraction)
        _check(1 <= self.kv.replication_interval_ms <= 10_000, "kv.replication_interval_ms", "must be in 1..10000",
               self.kv.replication_interval_ms)
        _check(self.scheduler.max_batch_tokens >= 1, "scheduler.max_batch_tokens", "must be >= 1",
               self.scheduler.max_batch_tokens)
        _check(self.scheduler.max_running >= 1, "scheduler.max_running", "must be >= 1",
               self.scheduler.max_running)
        _check(self.scheduler.max_waiting >= 1, "scheduler.max_waiting", "must be >= 1",
               self.scheduler.max_waiting)
        _check(self.health.heartbeat_interval_s > 0, "health.heartbeat_interval_s", "must be > 0",
               self.health.heartbeat_interval_s)
        _check(self.health.heartbeat_timeout_s > self.health.heartbeat_interval_s,
               "health.heartbeat_timeout_s", "must exceed health.heartbeat_interval_s",
               self.health.heartbeat_timeout_s)
        _check(self.recovery in ("kevlar", "restart"), "recovery", "must be kevlar or restart",
               self.recovery)
        _check(self.log_format in ("text", "json"), "log_format", "must be text or json", self.log_format)
        return self


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; any other name or address may be reachable from outside."""
    host = host.strip().strip("[]")
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def check_exposure(server: ServerConfig) -> None:
    """Refuse to serve beyond this machine without both tokens: anyone who reaches the port could
    use the model (no server.api_key) or break workers (the admin token would only be in a file)."""
    if is_loopback_host(server.host):
        return
    missing = [name for name, value in (("server.api_key", server.api_key),
                                        ("server.admin_token", server.admin_token)) if not value]
    if missing:
        raise ConfigError(
            f"server.host: {server.host!r} is not a loopback address, so the API and the admin endpoints "
            f"would be reachable from other machines; set both server.api_key and server.admin_token "
            f"before binding it (missing: {', '.join(missing)}), or bind 127.0.0.1")


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: {rule}, got {value!r}")


def parse_devices(spec: str) -> tuple[str, list[int]] | tuple[str, None]:
    """'auto' -> ('auto', None); 'cpu:4' -> ('cpu', [0,1,2,3]); 'cuda:0,1' -> ('cuda', [0,1]).
    A GPU id may repeat ('cuda:0,0,0,0,0'): those workers share that GPU, separate processes on
    one device, which is how a one-GPU machine runs (and tests) pipelines, buddies and spares."""
    if spec == "auto":
        return "auto", None
    kind, _, rest = spec.partition(":")
    try:
        if kind == "cpu":
            n = int(rest)
            if n < 1:
                raise ValueError
            return "cpu", list(range(n))
        if kind == "cuda":
            ids = [int(x) for x in rest.split(",") if x.strip()]
            if not ids or any(i < 0 for i in ids):
                raise ValueError
            return "cuda", ids
    except ValueError:
        pass
    raise ConfigError(f"cluster.devices: must be auto, cpu:N or cuda:0,1,..., got {spec!r}")


_SECTIONS = {f.name: f.type for f in fields(Config)}


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load `path` (TOML) if given, apply dotted `overrides` ({"server.port": 9000}), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: {'not a file' if p.exists() else 'no such file'} {str(p)!r}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        target = raw.setdefault(section, {}) if section else raw
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a table")
        target[key] = value
    return _build(raw).validate()


def _build(raw: dict[str, Any]) -> Config:
    kwargs: dict[str, Any] = {}
    defaults = Config()
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown field")
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: must be a table")
            kwargs[name] = _build_section(name, current, value)
        else:
            kwargs[name] = _coerce(name, current, value)
    return Config(**kwargs)


def _build_section(section: str, current: Any, values: dict[str, Any]) -> Any:
    known = {f.name for f in fields(current)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown field")
        out[key] = _coerce(f"{section}.{key}", getattr(current, key), value)
    return dataclasses.replace(current, **out)


def _coerce(name: str, default: Any, value: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "on", "off"):
            return value.lower() in ("true", "1", "on")
        raise ConfigError(f"{name}: must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, (int, float)) else float(str(value).strip())
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: must be a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{name}: must be a string, got {value!r}")
    return value
