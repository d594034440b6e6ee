"""The stage forward's batch invariance, bitwise: a request's numbers do not depend on what else is
in the batch, where it sits, or whether its tokens were computed as one chunk or one by one."""
from __future__ import annotations

import pytest
import torch

from kevlard.gpu.kv_cache import KVCache, attention_dtype
from kevlard.gpu.stage import ChunkView, Linear, StageModel, tiled_linear
from kevlard.gpu.weight_store import HostWeightStore, attach_stage
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


@pytest.mark.parametrize("kind", ["tiled", "packed"])
def test_linear_rows_do_not_depend_on_the_batch(kind):
    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    linear = (lambda x: tiled_linear(x, w, b)) if kind == "tiled" else Linear(w, b)
    x = torch.randn(300, 64)
    alone = linear(x[:1])
    for m in (2, 7, 16, 17, 40, 255, 300):
        assert torch.equal(linear(x[:m])[:1], alone)
    for before in (5, 16, 100):
        moved = torch.cat([torch.randn(before, 64), x[:1]])
        assert torch.equal(linear(moved)[before:], alone)
    assert torch.allclose(alone, x[:1] @ w.t() + b, rtol=1e-5, atol=1e-5)


def test_cpu_weights_are_packed_for_onednn_when_available():
    linear = Linear(torch.randn(32, 16))
    assert (linear.packed is not None) == torch.backends.mkldnn.is_available()


def test_request_alone_equals_request_in_a_crowd_and_chunked_equals_decoded(tmp_path):
    store, make = tiny_stage(tmp_path)
    try:
        g = torch.Generator().manual_seed(1)
        a = torch.randint(3, 300, (23,), generator=g).tolist()
        b = torch.randint(3, 300, (9,), generator=g).tolist()
        reqs = {"a": (a, tuple(range(8))), "b": (b, tuple(range(8, 16)))}
        alone = run_chunks(make(), {"a": reqs["a"]}, [[("a", 0, 23)]])["a"]
        # in a crowd, second in the batch, prefilled in uneven chunks next to another request
        crowd = run_chunks(make(), reqs, [[("b", 0, 9), ("a", 0, 10)], [("a", 10, 13)]])["a"]
        # token by token, the way decoding computes it
        decoded = run_chunks(make(), {"a": reqs["a"]}, [[("a", i, 1)] for i in range(23)])["a"]
        assert torch.equal(crowd, alone)
        assert torch.equal(decoded, alone)
    finally:
        store.close()
