"""The model's tokenizer without transformers: the `tokenizers` library, with chat_template.py for templates.

`AutoTokenizer.from_pretrained` costs ~3 s, most of it importing transformers, and `kevlard serve`
must be ready within 5 s. `Tokenizer.from_dir` builds the same Rust tokenizer transformers 5
builds, by replaying the calls its loader makes (TokenizersBackend; Qwen2Tokenizer and
GPT2Tokenizer, which rebuild the pipeline around tokenizer.json's vocabulary), and tokenizes the chat
templates that `kevlard.chat_template` renders. A directory whose tokenizer class it does not reproduce
raises `UnsupportedTokenizerError`; `load_tokenizer` then falls back to `AutoTokenizer`.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from kevlard.chat_template import (
    read_template_files,
    reject_unsupported_options,
    render_conversations,
    select_template,
)

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REBUILT_CLASSES = ("Qwen2Tokenizer", "GPT2Tokenizer")  # classes whose pipeline replaces tokenizer.json's
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend")
# transformers' TOKENIZER_MAPPING_NAMES for the model types kevlard serves (SUPPORTED_ARCHS); None:
# unregistered. Other model types fall back to AutoTokenizer rather than guess its table.
_REGISTERED_CLASS = {"": None, "llama": None, "mistral": "TokenizersBackend", "qwen2": "Qwen2Tokenizer"}
_HUB_CLASS_DISTRUSTED = ("qwen2",)  # transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, restricted likewise
_MODEL_IDS_TO_TOKENIZERS_BACKEND = (
    "deepseek-ai/deepseek-r1-distill-llama-*", "deepseek-ai/deepseek-coder-*", "allenai/dolma2-tokenizer",
    "google/umt5-small", "naver-clova-ix/donut-*", "salesforce/blip2-opt-*", "salesforce/blip2-flan-t5-*",
    "salesforce/instructblip-flan-t5-*", "stepfun-ai/step-3.7-*",
)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_MISTRAL_REGEX_VOCAB = 100_000  # above this transformers may patch the pre-tokenizer (fix_mistral_regex)


class UnsupportedTokenizerError(ValueError):
    """This directory's tokenizer is one `Tokenizer` does not reproduce exactly; use AutoTokenizer."""


class Tokenizer:
    """encode / decode / apply_chat_template with transformers 5's results, on a Rust tokenizer."""

    def __init__(self, backend: RustTokenizer, special_tokens: dict[str, Any], extra_special_tokens: list,
                 chat_template: str | dict[str, str] | None, clean_up_tokenization_spaces: bool = False,
                 clean_up_even_for_bpe: bool = False, name_or_path: str = "") -> None:
        self.backend = backend
        self._special_tokens = special_tokens  # attribute -> str | AddedToken | None, in transformers' order
        self._extra_special_tokens = extra_special_tokens
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # transformers skips the clean-up for BPE models, which it would corrupt, unless told otherwise.
        self._clean_up = clean_up_tokenization_spaces and (
            type(backend.model).__name__ != "BPE" or clean_up_even_for_bpe)
        self.name_or_path = name_or_path

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer in `path` as AutoTokenizer would; UnsupportedTokenizerError if we can't."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise UnsupportedTokenizerError(f"{path} has no tokenizer.json")
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        class_name = _tokenizer_class(path, tokenizer_config, _read_json(path / "config.json"))
        if class_name not in ("TokenizersBackend", *_REBUILT_CLASSES):
            raise UnsupportedTokenizerError(f"{path}: transformers loads it as {class_name}, which kevlard does not mirror")
        kwargs, added_tokens_decoder = _init_kwargs(path, tokenizer_config)
        if class_name in _REBUILT_CLASSES:
            backend, added_tokens_decoder = _rebuilt_backend(class_name, path, kwargs, added_tokens_decoder)
        else:
            backend = RustTokenizer.from_file(str(path / "tokenizer.json"))
            if added_tokens_decoder is None:  # tokenizer.json's own added tokens, as AddedToken(**json) would give
                added_tokens_decoder = backend.get_added_tokens_decoder()
        # encode() and apply_chat_template() never pad or truncate.
        backend.no_truncation()
        backend.no_padding()
        special_tokens, extra_special_tokens = _special_tokens(kwargs)
        backend.encode_special_tokens = bool(kwargs.get("split_special_tokens", False))
        _add_missing_tokens(backend, added_tokens_decoder, special_tokens, extra_special_tokens)
        if backend.get_vocab_size() > _MISTRAL_REGEX_VOCAB and kwargs.get("fix_mistral_regex"):
            raise UnsupportedTokenizerError(f"{path}: fix_mistral_regex patches the pre-tokenizer")
        if backend.post_processor is None:  # update_post_processor() without add_bos/add_eos
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        tokenizer = cls(backend, special_tokens, extra_special_tokens, kwargs.get("chat_template"),
                        bool(kwargs.get("clean_up_tokenization_spaces", False)),
                        bool(kwargs.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")),
                        str(path))
        if class_name == "Qwen2Tokenizer":  # Qwen2Tokenizer.__init__'s last step
            backend.add_tokens([AddedToken(token, special=True) for token in tokenizer.all_special_tokens])
        return tokenizer

    # --- vocabulary and special tokens ---------------------------------------------------------

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {attr: str(value) for attr, value in self._special_tokens.items() if value is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = [str(v) for v in self._special_tokens.values() if v is not None]
        return list(dict.fromkeys(tokens + [str(t) for t in self._extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def _special_token(self, attr: str) -> str | None:
        value = self._special_tokens.get(attr)
        return None if value is None else str(value)

    def _special_id(self, attr: str) -> int | None:
        token = self._special_token(attr)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token = property(lambda self: self._special_token("bos_token"))
    eos_token = property(lambda self: self._special_token("eos_token"))
    unk_token = property(lambda self: self._special_token("unk_token"))
    pad_token = property(lambda self: self._special_token("pad_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            token_id = self.backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # --- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str | list[str]:
        """Token ids (an int, a sequence, or a batch of sequences) back to text."""
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(seq, skip_special_tokens) for seq in ids]
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    # --- chat templates ------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        return select_template(self.chat_template, chat_template, tools)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = False, *, tools: list | None = None, documents: list | None = None,
                            chat_template: str | None = None, continue_final_message: bool | str = False, **kwargs):
        """Render `messages` (or a batch of conversations) like transformers' apply_chat_template.

        Returns the token ids (list[int]), the rendered text when tokenize=False, or
        {"input_ids", "attention_mask"} when return_dict=True. Other keyword arguments reach the
        template, as in transformers.
        """
        reject_unsupported_options(kwargs)
        template = self.get_chat_template(chat_template, tools)
        rendered, batched = render_conversations(template, messages, tools, documents, continue_final_message,
                                                 add_generation_prompt, {**self.special_tokens_map, **kwargs})
        if not tokenize:
            return rendered if batched else rendered[0]
        ids = [self.encode(text, add_special_tokens=False) for text in rendered]
        if return_dict:
            masks = [[1] * len(seq) for seq in ids]
            return {"input_ids": ids, "attention_mask": masks} if batched else {
                "input_ids": ids[0], "attention_mask": masks[0]}
        return ids if batched else ids[0]


def load_tokenizer(path: str | Path):
    """`Tokenizer.from_dir(path)`, or transformers' AutoTokenizer where that cannot reproduce it."""
    try:
        return Tokenizer.from_dir(path)
    except ValueError:
        from transformers import AutoTokenizer

        files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
        if not any((Path(path) / name).is_file() for name in files):
            raise ValueError(f"{path} has no tokenizer: none of {', '.join(files)} is there "
                             "(copy the model's tokenizer files next to its weights)") from None
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# --- loading: what transformers' AutoTokenizer.from_pretrained does, for the cases we mirror -------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _tokenizer_class(path: Path, tokenizer_config: dict, config: dict) -> str:
    """The class AutoTokenizer picks for `path` (models/auto/tokenization_auto.py), "Fast" stripped."""
    if "auto_map" in tokenizer_config or "fast_tokenizer_files" in tokenizer_config:
        raise UnsupportedTokenizerError(f"{path}: remote code or versioned tokenizer files")
    model_type = config.get("model_type") or ""
    if model_type not in _REGISTERED_CLASS:
        raise UnsupportedTokenizerError(f"{path}: model type {model_type!r} is not one kevlard mirrors")
    registered = _REGISTERED_CLASS[model_type]
    if model_type == "mistral" and _mistral_common_installed():
        raise UnsupportedTokenizerError(f"{path}: mistral-common may take over this tokenizer")
    if any(fnmatch.fnmatch(str(path).lower(), pattern) for pattern in _MODEL_IDS_TO_TOKENIZERS_BACKEND):
        return "TokenizersBackend"
    config_class = tokenizer_config.get("tokenizer_class")
    hub_class = config_class or config.get("tokenizer_class")
    if (hub_class and hub_class.removesuffix("Fast") == "LlamaTokenizer" and model_type not in _HUB_CLASS_DISTRUSTED
            and '"ByteLevel"' in (path / "tokenizer.json").read_text(encoding="utf-8")):
        return "TokenizersBackend"  # a Llama-3-style tokenizer that declares LlamaTokenizer
    if hub_class and model_type and registered and registered.removesuffix("Fast") != hub_class.removesuffix("Fast"):
        if registered not in _GENERIC_CLASSES:
            name = registered if model_type in _HUB_CLASS_DISTRUSTED else hub_class
            if name.removesuffix("Fast") not in _GENERIC_CLASSES:
                return name.removesuffix("Fast")
        return "TokenizersBackend"
    if config_class:  # the slow PythonBackend ("PreTrainedTokenizer") is swapped for TokenizersBackend here
        name = config_class.removesuffix("Fast")
        return "TokenizersBackend" if name in (*_GENERIC_CLASSES, "PreTrainedTokenizer") else name
    if hub_class:  # config.json's, taken as is: PythonBackend stays the slow one
        name = hub_class if hub_class == "PreTrainedTokenizerFast" else hub_class.removesuffix("Fast")
        return "TokenizersBackend" if name in ("TokenizersBackend", "PreTrainedTokenizerFast") else name
    return registered or "TokenizersBackend"


def _mistral_common_installed() -> bool:
    return importlib.util.find_spec("mistral_common") is not None


def _init_kwargs(path: Path, tokenizer_config: dict) -> tuple[dict, dict[int, AddedToken] | None]:
    """The class's init kwargs and added tokens, as PreTrainedTokenizerBase._from_pretrained builds them.

    The added tokens are None where they come from tokenizer.json itself (the caller has it parsed).
    """
    kwargs = dict(tokenizer_config)
    for key in ("tokenizer_class", "init_inputs", "add_bos_token", "add_eos_token"):
        kwargs.pop(key, None)  # add_bos/eos_token: ignored next to a tokenizer.json
    templates = read_template_files(path)
    if templates is not None:
        kwargs["chat_template"] = templates
    if isinstance(kwargs.get("chat_template"), (list, tuple)):
        kwargs["chat_template"] = {t["name"]: t["template"] for t in kwargs["chat_template"]}
    if "additional_special_tokens" in kwargs and not kwargs.get("extra_special_tokens"):
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    model_specific = {key: kwargs.pop(key) for key in list(kwargs)
                      if key not in SPECIAL_TOKENS_ATTRIBUTES and key.endswith("_token") and isinstance(kwargs[key], str)}
    if isinstance(kwargs.get("extra_special_tokens"), dict):
        model_specific.update(kwargs.pop("extra_special_tokens"))
    if model_specific:
        kwargs["model_specific_special_tokens"] = model_specific
    added_tokens_decoder: dict[int, AddedToken] | None = None
    if "added_tokens_decoder" in kwargs:
        added_tokens_decoder = {int(i): AddedToken(**t) if isinstance(t, dict) else t
                                for i, t in kwargs.pop("added_tokens_decoder").items()}
    else:  # the legacy files
        for key, value in _read_json(path / "special_tokens_map.json").items():
            if isinstance(value, dict) and key != "extra_special_tokens":
                value = AddedToken(**{k: v for k, v in value.items() if k != "special"}, special=True)
            elif key == "extra_special_tokens" and isinstance(value, list):
                merged = list(kwargs.get("extra_special_tokens") or [])
                for token in value:
                    token = AddedToken(**token, special=True) if isinstance(token, dict) else token
                    if token not in merged:
                        merged.append(token)
                value = merged
            kwargs[key] = value
        if isinstance(kwargs.get("extra_special_tokens"), dict):
            kwargs.setdefault("model_specific_special_tokens", {}).update(kwargs.pop("extra_special_tokens"))
        if (path / "added_tokens.json").is_file():
            raise UnsupportedTokenizerError(f"{path}: legacy added_tokens.json")
    return _convert_added_tokens(kwargs), added_tokens_decoder


def _convert_added_tokens(obj):
    """{"__type": "AddedToken", ...} dicts, at any depth, to AddedToken (convert_added_tokens)."""
    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        return AddedToken(**{k: v for k, v in obj.items() if k != "__type"})
    if isinstance(obj, (list, tuple)):
        return [_convert_added_tokens(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_added_tokens(v) for k, v in obj.items()}
    return obj


def _rebuilt_backend(class_name: str, path: Path, kwargs: dict, added_tokens_decoder):
    """Qwen2Tokenizer / GPT2Tokenizer: tokenizer.json's vocabulary and merges in the class's own pipeline."""
    tokenizer_json = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedTokenizerError(f"{path}: {class_name} over a {model.get('type')} model")
    vocab = model["vocab"]
    if isinstance(vocab, list):
        vocab = {token[0] if isinstance(token, list) else token: i for i, token in enumerate(vocab)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    # The post-processor is tokenizer.json's; transformers reads it from the file without the vocabulary.
    minimal = {**tokenizer_json, "model": {**model, "vocab": {}, "merges": []}, "added_tokens": []}
    post_processor = RustTokenizer.from_str(json.dumps(minimal)).post_processor
    add_prefix_space = bool(kwargs.get("add_prefix_space"))
    if class_name == "Qwen2Tokenizer":
        backend = RustTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                    continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                    byte_fallback=False))
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
        defaults = ("unk_token", "eos_token", "pad_token")
    else:
        backend = RustTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                    end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        defaults = ("unk_token", "bos_token", "eos_token")
    backend.decoder = decoders.ByteLevel()
    if post_processor is not None:
        backend.post_processor = post_processor
    for key in defaults:  # the class's __init__ defaults
        kwargs.setdefault(key, "<|endoftext|>")
    if added_tokens_decoder is None:
        added_tokens_decoder = {t.pop("id"): AddedToken(**t) for t in tokenizer_json.get("added_tokens", [])}
    return backend, added_tokens_decoder


def _special_tokens(kwargs: dict) -> tuple[dict[str, Any], list]:
    """Named special tokens (attribute -> token, model-specific ones after the standard seven) and extras."""
    if "additional_special_tokens" in kwargs and "extra_special_tokens" not in kwargs:
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    special: dict[str, Any] = dict.fromkeys(SPECIAL_TOKENS_ATTRIBUTES)
    extra: list = []
    auto_model_specific = {}
    for key, value in kwargs.items():
        if key in SPECIAL_TOKENS_ATTRIBUTES:
            if value is not None and not isinstance(value, (str, AddedToken)):
                raise UnsupportedTokenizerError(f"special token {key} has to be a str, got {value!r}")
            if value is not None:
                special[key] = value
        elif key == "extra_special_tokens" and value is not None:
            if isinstance(value, dict):
                special.update(value)
            else:
                extra = list(value)
        elif key.endswith("_token") and isinstance(value, (str, AddedToken)):
            auto_model_specific[key] = value
    special.update({**auto_model_specific, **(kwargs.get("model_specific_special_tokens") or {})})
    return special, extra


def _add_missing_tokens(backend: RustTokenizer, added_tokens_decoder: Mapping[int, AddedToken],
                        special_tokens: dict[str, Any], extra_special_tokens: list) -> None:
    """TokenizersBackend.__init__'s add_tokens call, with the same tokens in the same order."""
    # transformers compares against repr()s of the added-token ids, so it re-adds every one of them.
    tokens_to_add = [token for _, token in sorted(added_tokens_decoder.items())]
    encoder = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items())]
    encoder += [str(t) for t in tokens_to_add]
    for value in [v for v in special_tokens.values() if v is not None] + list(extra_special_tokens):
        if str(value) not in encoder and value not in tokens_to_add:
            tokens_to_add.append(value)
    named = [str(v) for v in special_tokens.values() if v]
    tokens = []
    for token in tokens_to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and str(token) in named:
            token.special = True
        tokens.append(token)
    if tokens:
        backend.add_tokens(tokens)


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
