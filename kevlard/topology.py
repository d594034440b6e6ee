"""Which devices, how many pipelines and stages, and which layers each stage holds."""
from __future__ import annotations

from dataclasses import dataclass

from kevlard.config import ClusterConfig, ConfigError, parse_devices


@dataclass(frozen=True)
class Topology:
    kind: str  # cpu | cuda
    pipelines: int
    stages: int
    spares: int
    devices: tuple[str, ...]  # one per worker: workers 0..P*K-1 serve pipelines, the rest are spares

    @property
    def num_workers(self) -> int:
        return len(self.devices)

    def route(self, pipeline: int) -> list[int]:
        """Initial worker ids of a pipeline, one per stage."""
        return [pipeline * self.stages + s for s in range(self.stages)]

    @property
    def spare_ids(self) -> list[int]:
        return list(range(self.pipelines * self.stages, self.num_workers))


def plan_topology(cluster: ClusterConfig, cuda_count: int) -> Topology:
    kind, ids = parse_devices(cluster.devices)
    if kind == "auto":
        if cuda_count > 0:
            kind, ids = "cuda", list(range(cuda_count))
        else:
            kind, ids = "cpu", list(range(4))
    if kind == "cuda" and cuda_count == 0:
        raise ConfigError(f"cluster.devices: {cluster.devices!r} asks for CUDA, but no GPU is visible")
    if kind == "cuda" and max(ids) >= cuda_count:
        raise ConfigError(f"cluster.devices: GPU {max(ids)} does not exist ({cuda_count} visible)")
    n = len(ids)
    pipelines = cluster.pipelines or (2 if n >= 4 else 1)
    stages = cluster.stages or max(1, n // pipelines)
    if kind == "cpu":
        # virtual devices are free: spares get their own on top of the pipelines' ones
        spares = 1 if cluster.spares < 0 else cluster.spares
        if pipelines * stages > n:
            raise ConfigError(f"cluster.pipelines x cluster.stages = {pipelines * stages} exceeds the "
                              f"{n} devices of cluster.devices = {cluster.devices!r}")
        devices = tuple(f"cpu:{i}" for i in range(pipelines * stages + spares))
    else:
        if pipelines * stages > n:
            raise ConfigError(f"cluster.pipelines x cluster.stages = {pipelines * stages} exceeds the "
                              f"{n} GPUs of cluster.devices")
        left = n - pipelines * stages
        spares = left if cluster.spares < 0 else cluster.spares
        if spares > left:
            raise ConfigError(f"cluster.spares: {spares} spares need {spares} more GPUs, {left} left")
        devices = tuple(f"cuda:{i}" for i in ids[:pipelines * stages + spares])
    return Topology(kind, pipelines, stages, spares, devices)


def split_layers(num_layers: int, stages: int, head_cost_layers: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous layer ranges, balanced so that the last stage's LM head counts as
    `head_cost_layers` layers of work. Every stage gets at least one layer."""
    if stages < 1:
        raise ConfigError(f"cluster.stages: must be >= 1, got {stages}")
    if stages > num_layers:
        raise ConfigError(f"cluster.stages: {stages} stages for a model of {num_layers} layers")
    total = num_layers + head_cost_layers
    bounds, start = [], 0
    for s in range(stages):
        left_stages = stages - s
        if s == stages - 1:
            end = num_layers
        else:
            target = (total - start) / left_stages if s < stages - 1 else 0
            end = min(num_layers - (left_stages - 1), max(start + 1, round(start + target)))
        bounds.append((start, end))
        start = end
    return bounds
