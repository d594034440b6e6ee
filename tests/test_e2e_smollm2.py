"""End to end on the embedded default model, SmolLM2-135M-Instruct: the real daemon over HTTP
answers greedy chat requests exactly as transformers' own greedy `generate` does on the same
weights, for every topology, one request at a time and eight at once."""
from __future__ import annotations

import concurrent.futures

import pytest
import torch

from tests.daemon_proc import running_daemon

pytestmark = pytest.mark.slow

MAX_NEW = 24
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a GPU is in one sentence.",
    "List three fruits.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to program.",
    "Why is the sky blue?",
    "Name a famous painter and one of their works.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


@pytest.fixture(scope="module")
def smollm2():
    from kevlard.model_source import resolve_model

    source = resolve_model("")
    tokenizer = source.load_tokenizer()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.weights_dir, dtype=torch.float32).eval()
    expected = []
    for q in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False)
        expected.append(out[0, len(ids):].tolist())
    return source, expected


def chat(client, question: str) -> list[int]:
    r = client.post("/v1/chat/completions", json={
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_NEW, "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize("topology", ["1x1", "1x2", "2x2", "1x4"])
def test_greedy_equals_transformers_on_smollm2(smollm2, topology, tmp_path):
    source, expected = smollm2
    p, k = topology.split("x")
    args = ["--devices", f"cpu:{int(p) * int(k)}", "--pipelines", p, "--stages", k, "--spares", "0"]
    with running_daemon(args, tmp_path) as daemon, daemon.client() as client:
        one_at_a_time = [chat(client, q) for q in QUESTIONS]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            at_once = list(pool.map(lambda q: chat(client, q), QUESTIONS))
    # the reference stops at <|im_end|> too; compare up to and including it
    assert one_at_a_time == expected
    assert at_once == expected
