"""End to end on tiny random models: real daemon, real workers, real HTTP.

Greedy output must equal transformers' own greedy `generate` on the same weights, token for
token, for Llama and Qwen2, for every topology, one request at a time and several at once.
"""
from __future__ import annotations

import concurrent.futures
import random

import pytest
import torch

from tests.daemon_proc import running_daemon
from tests.tiny_models import make_tiny_model

MAX_NEW = 12


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # lengths cross KV blocks (block size 4 below) and the 32-token budget (chunked prefill)
    lengths = [1, 3, 4, 5, 17, 40, 9, 70][:n]
    return [[rng.randrange(3, 300) for _ in range(length)] for length in lengths]


def hf_greedy(model_dir, prompt_ids: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in prompt_ids:
        gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        out.append(gen[0, len(ids):].tolist())
    return out


def complete(client, ids: list[int]) -> dict:
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": MAX_NEW, "temperature": 0,
                                             "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()


def serve_args(model_dir, topology: str, tmp_path) -> list[str]:
    """`kevlard serve` on `model_dir` as PxK, small blocks and budget (chunked prefill), no spare."""
    p, k = topology.split("x")
    conf = tmp_path / "kevlard.toml"
    conf.write_text("[kv]\nblock_size = 4\nnum_blocks = 128\n[scheduler]\nmax_batch_tokens = 32\n")
    return ["--config", str(conf), "--model", str(model_dir), "--devices", f"cpu:{int(p) * int(k)}",
            "--pipelines", p, "--stages", k, "--spares", "0"]


def until_eos(tokens: list[int]) -> list[int]:
    eos = {0, 2}  # the tiny models' generation_config
    cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": make_tiny_model(root, "llama", num_layers=4),
            "qwen2": make_tiny_model(root, "qwen2", num_layers=4),
            "llama-tied": make_tiny_model(root, "llama", num_layers=4, tie=True, name="tied")}


@pytest.mark.parametrize("model,topology", [
    ("llama", "1x1"), ("llama", "1x2"), ("llama", "2x2"), ("llama", "1x4"),
    ("qwen2", "1x2"), ("qwen2", "2x2"), ("llama-tied", "1x1"),
])
def test_greedy_equals_transformers(models, model, topology, tmp_path):
    model_dir = models[model]
    ps = prompts(8)
    expected = [until_eos(t) for t in hf_greedy(model_dir, ps)]
    p, k = topology.split("x")
    args = serve_args(model_dir, topology, tmp_path)
    with running_daemon(args, tmp_path) as daemon, daemon.client() as client:
        one_at_a_time = [complete(client, ids)["choices"][0]["token_ids"] for ids in ps]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            at_once = [r["choices"][0]["token_ids"] for r in pool.map(lambda ids: complete(client, ids), ps)]
        cluster = client.get("/api/cluster").json()
    assert one_at_a_time == expected
    assert at_once == expected
    assert len(cluster["pipelines"]) == int(p)
    assert all(len(pl["route"]) == int(k) for pl in cluster["pipelines"])
    assert cluster["num_running"] == 0 and cluster["kv_usage"] == 0.0


@pytest.mark.parametrize("topology", ["1x2", "2x2"])
def test_a_shared_prompt_prefix_is_served_from_the_cache_with_the_same_answers(models, topology, tmp_path):
    """2x2 replicates KV: there a block is shared once both stages' buddies hold it."""
    model_dir = models["llama"]
    rng = random.Random(5)
    system = [rng.randrange(3, 300) for _ in range(21)]  # 5 full blocks of 4, and one more token
    ps = [system + [rng.randrange(3, 300) for _ in range(n)] for n in (3, 6, 1, 9)]
    expected = [until_eos(t) for t in hf_greedy(model_dir, ps)]
    args = serve_args(model_dir, topology, tmp_path)
    with running_daemon(args, tmp_path) as daemon, daemon.client() as client:
        first = complete(client, ps[0])
        cached = 0
        for _ in range(100):  # the replica acks that make the blocks shareable come within ~50 ms
            second = complete(client, ps[1])
            cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
            if cached:
                break
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            at_once = [r["choices"][0]["token_ids"] for r in pool.map(lambda ids: complete(client, ids), ps)]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cached == 20
    assert [first["choices"][0]["token_ids"], second["choices"][0]["token_ids"]] == expected[:2]
    assert at_once == expected


def test_requests_preempted_for_lack_of_kv_all_finish_on_whichever_pipeline_takes_them(models, tmp_path):
    """Little KV, long answers: requests are preempted and taken back in by whichever pipeline has
    room, often one with nothing in flight. That pipeline must start on them at once: a request once
    sat there, every stream but it finished and nothing running, until the next request came in."""
    conf = tmp_path / "kevlard.toml"
    conf.write_text("[kv]\nblock_size = 4\nnum_blocks = 48\nreplication = false\n"
                    "[scheduler]\nmax_batch_tokens = 32\n")
    args = ["--config", str(conf), "--model", str(models["llama"]), "--devices", "cpu:2",
            "--pipelines", "2", "--stages", "1", "--spares", "0"]
    rng = random.Random(7)
    with running_daemon(args, tmp_path) as daemon, daemon.client(timeout=60) as client:
        for round_ in range(4):
            bodies = [{"prompt": [rng.randrange(3, 300) for _ in range(rng.choice((4, 30, 60)))],
                       "max_tokens": rng.choice((8, 90, 120)), "ignore_eos": True, "temperature": 0}
                      for _ in range(10)]
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                answers = list(pool.map(lambda body: client.post("/v1/completions", json=body), bodies))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
            assert [r.json()["usage"]["completion_tokens"] for r in answers] == [b["max_tokens"] for b in bodies]
        cluster = client.get("/api/cluster").json()
    assert cluster["stats"]["preemptions"] > 0  # the case this is about happened
    assert cluster["num_running"] == 0 and cluster["kv_usage"] == 0.0
