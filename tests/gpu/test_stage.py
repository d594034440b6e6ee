"""The stage forward's batch invariance, bitwise: a request's numbers do not depend on what else is
in the batch, where it sits, or whether its tokens were computed as one chunk or one by one."""
from __future__ import annotations

import torch

from kevlard.gpu.kv_cache import KVCache, attention_dtype
from kevlard.gpu.stage import ChunkView, StageModel, tiled_linear
from kevlard.gpu.weight_store import attach_stage, HostWeightStore
from kevlard.model_source import resolve_model
from tests.tiny_models import make_tiny_model


def tiny_stage(tmp_path, blocks=64):
    source = resolve_model(str(make_tiny_model(tmp_path, "qwen2", num_layers=3, hidden=128, heads=4, kv_heads=2)),
                           cache_dir=str(tmp_path / "cache"), progress=lambda m: None)
    store = HostWeightStore.create(source, "float32", "stage-test", shm_dir=str(tmp_path))
    weights = attach_stage(store.stage_handle(0, 3, True, True))
    spec = source.spec

    def make():
        kv = KVCache(3, blocks, 4, spec.num_kv_heads, spec.head_dim, attention_dtype(torch.float32))
        return StageModel(weights, spec, 0, 3, True, True, kv)
    return store, make


def run_chunks(stage, requests, plan):
    """requests: {name: (token ids, block table)}; plan: list of steps, each [(name, start, n)].
    Returns each request's output rows, concatenated in position order."""
    rows = {name: [] for name in requests}
    for step in plan:
        views, ids, positions, offset = [], [], [], 0
        for name, start, n in step:
            tokens, table = requests[name]
            views.append(ChunkView(offset, n, start, stage.kv.slots(table, start, start + n),
                                   stage.kv.slots(table, 0, start + n)))
            ids += tokens[start:start + n]
            positions += range(start, start + n)
            offset += n
        out = stage.forward(stage.embed(torch.tensor(ids)), views, torch.tensor(positions))
        for (name, _, n), v in zip(step, views):
            rows[name].append(out[v.offset:v.offset + n])
    return {name: torch.cat(r) for name, r in rows.items()}


def test_linear_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    x = torch.randn(40, 64)
    alone = tiled_linear(x[:1], w)
    for m in (2, 7, 16, 17, 40):
        assert torch.equal(tiled_linear(x[:m], w)[:1], alone)
    moved = torch.cat([torch.randn(5, 64), x[:1]])
    assert torch.equal(tiled_linear(moved, w)[5:], alone)


def test_request_alone_equals_request_in_a_crowd_and_chunked_equals_decoded(tmp_path):
    store, make = tiny_stage(tmp_path)
    try:
        g = torch.Generator().manual_seed(1)
        a = torch.randint(3, 300, (23,), generator=g).tolist()
        b = torch.randint(3, 300, (9,), generator=g).tolist()
        reqs = {"a": (a, tuple(range(0, 8))), "b": (b, tuple(range(8, 16)))}
        alone = run_chunks(make(), {"a": reqs["a"]}, [[("a", 0, 23)]])["a"]
        # in a crowd, second in the batch, prefilled in uneven chunks next to another request
        crowd = run_chunks(make(), reqs, [[("b", 0, 9), ("a", 0, 10)], [("a", 10, 13)]])["a"]
        # token by token, the way decoding computes it
        decoded = run_chunks(make(), {"a": reqs["a"]}, [[("a", i, 1)] for i in range(23)])["a"]
        assert torch.equal(crowd, alone)
        assert torch.equal(decoded, alone)
    finally:
        store.close()
