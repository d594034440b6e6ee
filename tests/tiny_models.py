"""Tiny random Hugging Face models for unit tests: built in-process, nothing downloaded.

`make_tiny_model` writes a directory that `kevlard.model_source.resolve_model` accepts:
config.json, model.safetensors, generation_config.json and a small byte-level BPE tokenizer
(tokenizer.json + tokenizer_config.json + chat template) trained on a few sentences.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# A ChatML template, the format SmolLM2 and Qwen2 use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TOKENIZER_VOCAB = 320

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "kevlard keeps serving when a device dies, hangs or slows down.",
    "Pipelines borrow a stage from their buddy and resume from the replica.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \" ? !",
    "user assistant system",
]


def make_tiny_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer (every byte encodable) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_model(
    tmp_path: Path,
    arch: str = "llama",
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 384,
    tie: bool = False,
    rope_scaling: dict | None = None,
    seed: int = 0,
    intermediate: int = 128,
    max_position_embeddings: int = 512,
    name: str = "",
) -> Path:
    """Build, save and return the directory of a random `arch` ("llama" | "qwen2") model.

    `rope_scaling` is a transformers `rope_parameters` dict without `rope_theta`, e.g.
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128}.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if vocab < TOKENIZER_VOCAB:
        raise ValueError(f"vocab must be >= the tokenizer's {TOKENIZER_VOCAB}, got {vocab}")
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope_parameters = {"rope_theta": 10000.0, **rope_scaling}
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        rope_parameters=rope_parameters,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():  # the default init leaves biases and norms at 0/1: randomise them too
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
    out_dir = Path(tmp_path) / (name or f"tiny-{arch}{'-tied' if tie else ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=0).save_pretrained(out_dir)
    make_tiny_tokenizer(out_dir)
    return out_dir
