"""The host weight store: one shared file, stage views equal to the checkpoint, no leaks."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from kevlard.gpu.weight_store import (
    ALIGNMENT,
    HostWeightStore,
    StageHandle,
    attach_stage,
    cleanup_stale_segments,
)
from kevlard.model_source import resolve_model
from tests.tiny_models import make_tiny_model


@pytest.fixture
def shm_dir(tmp_path):
    """Tests write their segments to a private directory so they cannot touch a daemon's."""
    path = tmp_path / "shm"
    path.mkdir()
    return str(path)


def checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in model_dir.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


def layer_names(names, first: int, last: int) -> set[str]:
    return {n for n in names if n.startswith("model.layers.") and first <= int(n.split(".")[2]) < last}


@pytest.mark.parametrize("tie", [False, True])
def test_two_stages_cover_the_checkpoint_bitwise(tmp_path, shm_dir, tie):
    model_dir = make_tiny_model(tmp_path, "qwen2", num_layers=4, tie=tie)
    expected = checkpoint(model_dir)
    with HostWeightStore.create(resolve_model(str(model_dir)), "float32", tag="t", shm_dir=shm_dir) as store:
        assert store.path == Path(shm_dir) / f"kevlard-{os.getpid()}-t-weights"
        assert store.path.stat().st_size == store.nbytes
        first = store.stage_handle(0, 2, is_first=True, is_last=False)
        last = store.stage_handle(2, 4, is_first=False, is_last=True)
        head = "model.embed_tokens.weight" if tie else "lm_head.weight"
        assert {e.name for e in first.entries} == {"model.embed_tokens.weight"} | layer_names(expected, 0, 2)
        assert {e.name for e in last.entries} == {"model.norm.weight", head} | layer_names(expected, 2, 4)
        assert all(e.offset % ALIGNMENT == 0 for e in first.entries + last.entries)
        assert pickle.loads(pickle.dumps(first)) == first
        for handle in (first, last):
            for name, tensor in attach_stage(handle).items():
                assert tensor.dtype == torch.float32
                assert torch.equal(tensor, expected[name]), name


def test_single_stage_holds_everything_once(tmp_path, shm_dir):
    model_dir = make_tiny_model(tmp_path, "llama", tie=True)
    with HostWeightStore.create(resolve_model(str(model_dir)), "float32", tag="one", shm_dir=shm_dir) as store:
        names = [e.name for e in store.stage_handle(0, 4, is_first=True, is_last=True).entries]
        assert len(names) == len(set(names)) == len(checkpoint(model_dir))


def test_cast_to_bfloat16(tmp_path, shm_dir):
    model_dir = make_tiny_model(tmp_path, "llama")
    expected = checkpoint(model_dir)
    with HostWeightStore.create(resolve_model(str(model_dir)), "bfloat16", tag="bf", shm_dir=shm_dir) as store:
        tensors = attach_stage(store.stage_handle(0, 4, is_first=True, is_last=True))
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        assert all(torch.equal(t, expected[n].to(torch.bfloat16)) for n, t in tensors.items())


def test_sharded_checkpoint(tmp_path, shm_dir):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path, "llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(model_dir)).save_pretrained(sharded, max_shard_size="50KB")
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (sharded / file).write_bytes((model_dir / file).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    expected = checkpoint(model_dir)
    with HostWeightStore.create(resolve_model(str(sharded)), "float32", tag="s", shm_dir=shm_dir) as store:
        tensors = attach_stage(store.stage_handle(1, 3, is_first=False, is_last=True))
        assert all(torch.equal(t, expected[n]) for n, t in tensors.items())


def test_bad_stage_ranges(tmp_path, shm_dir):
    with HostWeightStore.create(resolve_model(str(make_tiny_model(tmp_path))), "float32", shm_dir=shm_dir) as store:
        for first, last in ((2, 2), (-1, 2), (0, 5)):
            with pytest.raises(ValueError, match="outside"):
                store.stage_handle(first, last, is_first=False, is_last=False)


def _child_checksums(handle: StageHandle, results) -> None:
    tensors = attach_stage(handle)
    results.put({name: float(t.double().sum()) for name, t in tensors.items()})


def test_spawned_worker_sees_the_same_tensors(tmp_path, shm_dir):
    model_dir = make_tiny_model(tmp_path, "llama")
    expected = checkpoint(model_dir)
    with HostWeightStore.create(resolve_model(str(model_dir)), "float32", tag="spawn", shm_dir=shm_dir) as store:
        handle = store.stage_handle(2, 4, is_first=False, is_last=True)
        context = mp.get_context("spawn")
        results = context.Queue()
        child = context.Process(target=_child_checksums, args=(handle, results), daemon=True)
        child.start()
        try:
            sums = results.get(timeout=120)
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                child.join(timeout=10)
        assert child.exitcode == 0
        assert sums == {e.name: float(expected[e.name].double().sum()) for e in handle.entries}


def test_close_unlinks_and_is_idempotent(tmp_path, shm_dir):
    store = HostWeightStore.create(resolve_model(str(make_tiny_model(tmp_path))), "float32", tag="c", shm_dir=shm_dir)
    handle = store.stage_handle(0, 1, is_first=True, is_last=False)
    mapped = attach_stage(handle)  # a worker's mapping outlives the unlink
    assert store.path.exists()
    store.close()
    assert not store.path.exists()
    store.close()
    assert os.listdir(shm_dir) == []
    assert torch.isfinite(mapped["model.embed_tokens.weight"]).all()
    with pytest.raises(ValueError, match="closed"):
        store.stage_handle(0, 1, is_first=True, is_last=False)


def test_default_shm_dir_is_dev_shm(tmp_path):
    store = HostWeightStore.create(resolve_model(str(make_tiny_model(tmp_path))), "float32", tag="devshm")
    try:
        assert store.path.parent == Path("/dev/shm")
        assert store.path.exists()
    finally:
        store.close()
    assert not store.path.exists()


def test_cleanup_stale_segments(shm_dir):
    dead = Path(shm_dir) / "kevlard-999999999-x-weights"
    alive = Path(shm_dir) / f"kevlard-{os.getpid()}-x-weights"
    unrelated = Path(shm_dir) / "someone-else"
    for path in (dead, alive, unrelated):
        path.write_bytes(b"\0" * 64)
    assert cleanup_stale_segments(shm_dir) == [dead.name]
    assert not dead.exists() and alive.exists() and unrelated.exists()
