"""Typed messages between the daemon and its workers, and their one codec.

Every message is a frozen dataclass; `encode`/`decode` turn one into bytes and back, so the
channel can be a pipe today and a socket (or a Ray actor call) tomorrow.
"""
from __future__ import annotations

import pickle
import signal
from dataclasses import dataclass, field
from typing import Any


# ---------------------------------------------------------------- daemon -> worker

@dataclass(frozen=True)
class HostStage:
    """Host one stage: map (CPU) or copy (GPU) its weights from the host weight store."""
    cmd_id: int
    stage: int
    first_layer: int
    last_layer: int  # exclusive
    is_first: bool
    is_last: bool
    handle: Any  # kevlard.gpu.weight_store.StageHandle
    spec: Any  # kevlard.model_source.ModelSpec
    num_blocks: int
    block_size: int
    dtype: str
    replica_blocks: int = 0  # a replica pool for the stage it is buddy for: the block ids below this
    weights_dir: str | None = None  # load from disk instead of the host store (recovery = "restart")
    replication_interval_s: float = 1.0  # at most this long between shipments to the buddy


@dataclass(frozen=True)
class OpenLink:
    """Open a two-party link to `peer`; both sides get the same `name`, ranks 0 and 1."""
    cmd_id: int
    peer: int
    name: str
    rank: int
    rendezvous: str  # a file both sides open to find each other (see gpu/link.py)
    timeout_s: float
    purpose: str = "act"  # act: activations | repl: KV replicas (rank 1 receives) | xfer: KV hand-back


@dataclass(frozen=True)
class CloseLink:
    cmd_id: int
    peer: int
    purpose: str = "act"


@dataclass(frozen=True)
class SeqChunk:
    """One request's slice of a micro-batch: tokens [start, start + num_tokens) of its sequence."""
    req_id: int
    start: int
    num_tokens: int
    block_table: tuple[int, ...]
    token_ids: tuple[int, ...] = ()  # only sent to the first stage
    sample: bool = False  # the last stage samples one token after this chunk
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    output_index: int = 0  # which output token this sample is: seeds the draw, so replays match
    # the request's admission (its preemptions so far): its KV of an earlier one was in other blocks,
    # so a replica ack of that KV arriving late must not count for this one
    epoch: int = 0


@dataclass(frozen=True)
class Step:
    step_id: int
    pipeline: int
    chunks: tuple[SeqChunk, ...]
    recv_from: int | None  # worker id of the previous stage, None for the first stage
    send_to: int | None  # worker id of the next stage, None for the last stage
    pool: str = "primary"  # primary: the worker's own pipeline | replica: a pipeline it took over as buddy
    replicate: bool = False  # ship the KV this step writes to the buddy, in the background


@dataclass(frozen=True)
class PrepareKV:
    """A spare allocates, while it stands by, the KV memory of the largest stage and of its replica
    pool, which its HostStage then takes (gpu/hosting.prepare_kv)."""
    cmd_id: int
    num_layers: int
    num_blocks: int
    replica_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # the model's: the KV is one precision above (gpu/kv_cache.attention_dtype)


@dataclass(frozen=True)
class MoveKV:
    """Hand KV blocks over a link: `send` reads them from `pool`, the peer's `recv` writes its pool;
    `map` (CPU) copies them into `pool` from the peer's shared replica pool, `share` (pid, fd, size)."""
    cmd_id: int
    peer: int
    direction: str  # send | recv | map
    pool: str
    block_ids: tuple[int, ...]
    share: tuple[int, int, int] = (0, -1, 0)


# kill: SIGKILL from outside; the others are carried out inside the worker (gpu/worker.py)
FAULT_KINDS = ("kill", "hang", "slow", "device_error", "step_error")
# An injected hang starts at once, wherever the worker's main thread is (mid-step too), when the
# daemon signals that thread (Linux); elsewhere it comes as an InjectFault after the queued steps.
HANG_SIGNAL = signal.SIGUSR1
RELEASE_SIGNAL = signal.SIGUSR2  # a hang with a duration ends with this one


@dataclass(frozen=True)
class Backfill:
    """Ship this KV of the worker's own pool to its (new) replica holder: (req_id, epoch, start, end,
    block table) per request. Queued behind the steps already sent, so the KV is written by then."""
    pipeline: int
    stage: int
    spans: tuple[tuple[int, int, int, int, tuple[int, ...]], ...]


@dataclass(frozen=True)
class InjectFault:
    kind: str  # hang | slow | device_error | step_error
    duration_s: float | None = None


@dataclass(frozen=True)
class Shutdown:
    pass


# ---------------------------------------------------------------- worker -> daemon

@dataclass(frozen=True)
class WorkerReady:
    worker_id: int
    pid: int
    device: str


@dataclass(frozen=True)
class Heartbeat:
    worker_id: int
    sent_at: float  # time.monotonic() in the worker is not comparable; the daemon stamps arrival
    steps_done: int = 0
    computing_s: float = 0.0  # how long the step it computes has run since its input came (0: none)


@dataclass(frozen=True)
class CommandDone:
    worker_id: int
    cmd_id: int
    error: str | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepDone:
    worker_id: int
    step_id: int
    sampled: tuple[tuple[int, int], ...] = ()  # (req_id, token) from the last stage
    compute_s: float = 0.0


@dataclass(frozen=True)
class ReplicaAck:
    """The buddy `holder` stores replica KV: each request's stage-`stage` KV of pipeline `pipeline`
    is complete there over `upto`. Sent by the holder once the KV arrived over the link, or by the
    source itself once it copied the KV into the holder's pool (mapped shared memory)."""
    worker_id: int
    source: int
    holder: int
    pipeline: int
    stage: int
    upto: tuple[tuple[int, int, int, int], ...]  # (req_id, epoch, start, end): tokens [start, end) stored


@dataclass(frozen=True)
class StepFailed:
    worker_id: int
    step_id: int
    error: str
    own: bool = False  # the worker itself failed the step (not its link, not a neighbour)


@dataclass(frozen=True)
class WorkerFailure:
    """The worker hit an error it cannot recover from (a device error) and is about to exit."""
    worker_id: int
    kind: str
    message: str


def encode(msg: object) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> object:
    return pickle.loads(data)
