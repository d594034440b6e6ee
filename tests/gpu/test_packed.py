"""Linear layers packed once for oneDNN in the host store, mapped by workers, cached on disk: a
stage hosted from them computes bitwise what a stage that packs its own weights computes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from kevlard.gpu import packed
from kevlard.gpu.kv_cache import KVCache, attention_dtype
from kevlard.gpu.stage import StageModel
from kevlard.gpu.weight_store import HostWeightStore, attach_stage
from kevlard.model_source import resolve_model
from tests.gpu.test_stage import run_chunks
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not packed.supported(), reason="this torch cannot share packed oneDNN weights")


def source_of(tmp_path, arch="qwen2", tie=False):
    model = make_tiny_model(tmp_path, arch, num_layers=4, hidden=128, heads=4, kv_heads=2, tie=tie)
    return resolve_model(str(model), cache_dir=str(tmp_path / "cache"), progress=lambda m: None)


def stage_of(store, source, first, last, with_packed):
    spec = source.spec
    is_first, is_last = first == 0, last == spec.num_layers
    handle = store.stage_handle(first, last, is_first, is_last)
    weights = attach_stage(handle)
    maps = packed.attach_packed(handle.packed_path, handle.packed_bytes, handle.packed,
                                packed.stage_keys(first, last, is_last)) if with_packed else None
    kv = KVCache(last - first, 16, 4, spec.num_kv_heads, spec.head_dim, attention_dtype(torch.float32))
    return StageModel(weights, spec, first, last, is_first, is_last, kv, packed=maps)


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("llama", True)])
def test_a_stage_on_shared_packed_weights_computes_what_a_self_packing_one_does(tmp_path, arch, tie):
    source = source_of(tmp_path, arch, tie)
    plain = HostWeightStore.create(source, "float32", "plain", shm_dir=str(tmp_path))
    shared = HostWeightStore.create(source, "float32", "packed", shm_dir=str(tmp_path),
                                    packed_cache=tmp_path / "packed")
    try:
        # the packed store keeps no plain copy of the linear layers (the tied embedding stays: it embeds)
        names = set(shared.entries)
        assert not any(n.endswith(("q_proj.weight", "up_proj.weight", "down_proj.weight")) for n in names)
        assert "model.embed_tokens.weight" in names
        assert shared.packed_bytes > 0 and plain.packed_bytes == 0
        ids = torch.randint(3, 200, (11,), generator=torch.Generator().manual_seed(2)).tolist()
        plan = [[("a", 0, 6)], [("a", 6, 5)]]
        for first, last in ((0, 2), (2, 4)):
            ref = stage_of(plain, source, first, last, with_packed=False)
            new = stage_of(shared, source, first, last, with_packed=True)
            assert all(lin.packed is not None for lin in new.linears.values())
            if first == 0:
                a = run_chunks(ref, {"a": (ids, (0, 1, 2))}, plan)["a"]
                b = run_chunks(new, {"a": (ids, (0, 1, 2))}, plan)["a"]
                assert torch.equal(a, b)
            else:
                assert torch.equal(ref.logits(torch.randn(3, 128, generator=torch.Generator().manual_seed(3))),
                                   new.logits(torch.randn(3, 128, generator=torch.Generator().manual_seed(3))))
    finally:
        plain.close()
        shared.close()
    assert not [f for f in os.listdir(tmp_path) if f.startswith("kevlard-")]  # both files of each store gone


def test_the_cache_is_used_and_rebuilt_when_it_no_longer_matches(tmp_path):
    source = source_of(tmp_path)
    cache = tmp_path / "packed"
    modes = []

    def build():
        said = []
        store = HostWeightStore.create(source, "float32", f"c{len(os.listdir(tmp_path))}", shm_dir=str(tmp_path),
                                       packed_cache=cache, log=said.append)
        packed_path = store.stage_handle(0, 4, True, True).packed_path
        modes.append(os.stat(packed_path).st_mode)
        with open(packed_path, "rb") as f:
            data = f.read()
        store.close()
        return said[-1], data

    cache.mkdir()
    (cache / "linears.bin.tmp-999999999").write_bytes(b"half a cache")  # a daemon killed mid-write
    first, data = build()
    assert "packed, cached" in first
    assert not list(cache.glob("*.tmp-*"))
    again, same = build()
    assert "from the cache" in again and same == data
    # the segment copied from the cache is the owner's alone, as the weight store's is
    assert modes[-1] & 0o077 == 0, oct(modes[-1])
    # a cached layout oneDNN would not pick now (another CPU, another torch) is not used
    index = json.loads((cache / "index.json").read_text())
    index["entries"][0]["md"] = "00" + index["entries"][0]["md"][2:]
    (cache / "index.json").write_text(json.dumps(index))
    assert "packed, cached" in build()[0]
    # nor one packed from a checkpoint that has changed since
    st = next(source.weights_dir.glob("*.safetensors"))
    os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 10**9))
    assert "packed, cached" in build()[0]
    assert "from the cache" in build()[0]


def test_no_cache_directory_still_packs(tmp_path):
    source = source_of(tmp_path)
    store = HostWeightStore.create(source, "float32", "n", shm_dir=str(tmp_path), packed_cache=None)
    try:
        handle = store.stage_handle(0, 4, True, True)
        assert {e.key for e in handle.packed} == set(packed.stage_keys(0, 4, True))
    finally:
        store.close()
