"""kevlard's light tokenizer: what transformers' AutoTokenizer gives, token for token, without transformers."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from kevlard.tokenizer import Tokenizer, UnsupportedTokenizerError, load_tokenizer
from tests.tiny_models import CHAT_TEMPLATE, make_tiny_model, make_tiny_tokenizer

TEXTS = [
    "",
    "Hello world!",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "runs of     spaces and\u00a0no-break\u2003em spaces",
    "Grüße, naïve café — “curly” ‘quotes’",
    "combining e\u0301 versus precomposed é",  # NFC matters to Qwen2Tokenizer
    "日本語のテキスト 中文 한국어 العربية",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "<|im_end|>",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>x",
    "<repo_name> <filename> <mask>",
    "don't I'm we've they're it's",
    "Hello , world . How ? Fine !",  # what clean_up_tokenization_spaces would touch
    "1234567890 3.14159 -42 1e-9",
    "x" * 300,
    "def f(x):\n    return x ** 2  # square\n",
    "\x00\x01\x7f control bytes",
    "MixedCASE Words ALLCAPS",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be nice"},
        {"role": "user", "content": "Grüße 😀 <b>&</b>"},
        {"role": "assistant", "content": "Hello , world ."},
        {"role": "user", "content": "And\n\nagain", "name": None},
    ],
]
# Model type (None: no config.json) and declared tokenizer class -> the class transformers picks.
CLASS_CASES = [
    ("qwen2", "TokenizersBackend", "Qwen2Tokenizer"),
    ("llama", "Qwen2TokenizerFast", "Qwen2Tokenizer"),
    ("mistral", "Qwen2Tokenizer", "TokenizersBackend"),
    ("llama", "LlamaTokenizerFast", "TokenizersBackend"),  # a ByteLevel tokenizer.json
    (None, "PreTrainedTokenizerFast", "TokenizersBackend"),
    ("llama", "GPT2Tokenizer", "GPT2Tokenizer"),
    ("llama", None, "TokenizersBackend"),
    ("qwen2", None, "Qwen2Tokenizer"),
]
TINY_NAMES = ["tiny", "tiny-llama", "tiny-qwen2", "gpt2-class", "hub-style", "legacy-qwen2"]


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    edit(data)
    path.write_text(json.dumps(data))


def _hub_style(data: dict) -> None:
    """A transformers-4 era tokenizer_config.json, as many Hub repositories still have."""
    added = {"0": ("<|endoftext|>", True), "1": ("<|im_start|>", True), "2": ("<|im_end|>", True)}
    data["added_tokens_decoder"] = {
        index: {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": special}
        for index, (content, special) in added.items()
    }
    data["bos_token"] = {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "normalized": False,
                         "rstrip": False, "single_word": False, "special": True}
    data["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>", "quick"]  # "quick": an ordinary word
    data["mask_token"] = "<mask>"  # not in the vocabulary: added with a new id
    data["clean_up_tokenization_spaces"] = True  # transformers ignores it for BPE
    data["chat_template"] = CHAT_TEMPLATE


def _legacy_added_tokens(data: dict) -> None:
    """tokenizer.json's own added tokens with whitespace stripping, and one of them not special."""
    for token in data["added_tokens"]:
        if token["content"] == "<|im_end|>":
            token.update(rstrip=True, special=False)
        if token["content"] == "<|im_start|>":
            token.update(lstrip=True)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    make_tiny_tokenizer(root / "tiny")
    dirs = {
        "tiny": root / "tiny",
        "tiny-llama": make_tiny_model(root, arch="llama", num_layers=1),
        "tiny-qwen2": make_tiny_model(root, arch="qwen2", num_layers=1),
    }
    dirs["gpt2-class"] = root / "gpt2-class"
    shutil.copytree(dirs["tiny"], dirs["gpt2-class"])
    _edit_json(dirs["gpt2-class"] / "tokenizer_config.json", lambda d: d.update(tokenizer_class="GPT2Tokenizer"))
    dirs["hub-style"] = root / "hub-style"
    shutil.copytree(dirs["tiny-llama"], dirs["hub-style"])
    (dirs["hub-style"] / "chat_template.jinja").unlink()
    _edit_json(dirs["hub-style"] / "tokenizer_config.json", _hub_style)
    # No added_tokens_decoder: special_tokens_map.json and tokenizer.json's added tokens are read instead.
    dirs["legacy-qwen2"] = root / "legacy-qwen2"
    shutil.copytree(dirs["tiny-qwen2"], dirs["legacy-qwen2"])
    _edit_json(dirs["legacy-qwen2"] / "tokenizer.json", _legacy_added_tokens)
    (dirs["legacy-qwen2"] / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "additional_special_tokens": ["<|endoftext|>", "fox"],
    }))
    return dirs


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from kevlard.model_source import resolve_model

    return resolve_model("").weights_dir  # converts the embedded GGUF once into ~/.cache/kevlard


@pytest.fixture(params=["smollm2", *TINY_NAMES])
def tokenizer_dir(request) -> Path:
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_dir")
    return request.getfixturevalue("tiny_dirs")[request.param]


@pytest.fixture
def pair(tokenizer_dir):
    """(transformers' tokenizer, ours) for the same directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True), Tokenizer.from_dir(tokenizer_dir)


def test_the_tiny_directories_cover_the_classes_we_mirror(tiny_dirs):
    from transformers import AutoTokenizer

    classes = {name: type(AutoTokenizer.from_pretrained(str(path), local_files_only=True)).__name__
               for name, path in tiny_dirs.items()}
    assert classes == {"tiny": "TokenizersBackend", "tiny-llama": "TokenizersBackend",
                       "tiny-qwen2": "Qwen2Tokenizer", "gpt2-class": "GPT2Tokenizer",
                       "hub-style": "TokenizersBackend", "legacy-qwen2": "Qwen2Tokenizer"}


def test_encode_matches_transformers(pair):
    hf, ours = pair
    for text in TEXTS:
        for add_special_tokens in (True, False):
            assert ours.encode(text, add_special_tokens=add_special_tokens) == hf.encode(
                text, add_special_tokens=add_special_tokens), (text, add_special_tokens)


def test_decode_matches_transformers(pair):
    hf, ours = pair
    rng = random.Random(0)
    special_ids = hf.all_special_ids
    for _ in range(200):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(0, 16))] + rng.sample(special_ids, 2)
        rng.shuffle(ids)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
    for text in TEXTS:  # round trips, whitespace and clean-up included
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(pair):
    hf, ours = pair
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            text = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=False) == text
            ids = list(hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"])
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == ids
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            return_dict=True)["input_ids"] == ids


def test_vocabulary_and_special_tokens_match_transformers(pair):
    hf, ours = pair
    assert len(ours) == len(hf)
    assert ours.get_vocab() == hf.get_vocab()
    for attr in ("eos_token", "bos_token", "pad_token", "eos_token_id", "bos_token_id", "pad_token_id",
                 "unk_token_id", "all_special_ids", "all_special_tokens", "special_tokens_map", "chat_template"):
        assert getattr(ours, attr) == getattr(hf, attr), attr


def test_chat_template_features_match_transformers(tiny_dirs, tmp_path):
    """namespace, loop controls, tojson, raise_exception, {% generation %} and template variables."""
    from transformers import AutoTokenizer

    template = (
        "{%- set ns = namespace(count=0) -%}"
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{% if loop.index > 3 %}{% break %}{% endif %}{% set ns.count = ns.count + 1 %}\n"
        "  <|im_start|>{{ m.role }} {{ m | tojson }}\n"
        "{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>\n{% endfor %}"
        "{{ bos_token }}|{{ eos_token }}|{{ ns.count }}|{{ tools | tojson if tools else '' }}|{{ extra }}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = tmp_path / "features"
    shutil.copytree(tiny_dirs["tiny"], path)
    (path / "chat_template.jinja").write_text(template)
    hf, ours = AutoTokenizer.from_pretrained(str(path), local_files_only=True), Tokenizer.from_dir(path)
    messages = CONVERSATIONS[2] + [{"role": "user", "content": "a fourth, cut by break"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "é <b>"}}]
    for kwargs in ({}, {"tools": tools, "extra": "x"}, {"add_generation_prompt": True}):
        assert ours.apply_chat_template(messages, tokenize=False, **kwargs) == hf.apply_chat_template(
            messages, tokenize=False, **kwargs)
    with pytest.raises(jinja2.TemplateError, match="no bad roles"):
        ours.apply_chat_template([{"role": "bad", "content": "x"}])


@pytest.mark.parametrize(("model_type", "declared_class", "expected_class"), CLASS_CASES)
def test_picks_the_tokenizer_class_transformers_picks(tiny_dirs, tmp_path, model_type, declared_class,
                                                      expected_class):
    from transformers import AutoTokenizer

    path = tmp_path / "variant"
    shutil.copytree(tiny_dirs["tiny-qwen2"], path)
    if model_type is None:
        (path / "config.json").unlink()
    else:
        _edit_json(path / "config.json", lambda d: d.update(model_type=model_type))
    _edit_json(path / "tokenizer_config.json",
               lambda d: d.update(tokenizer_class=declared_class) if declared_class else d.pop("tokenizer_class"))
    hf, ours = AutoTokenizer.from_pretrained(str(path), local_files_only=True), Tokenizer.from_dir(path)
    assert type(hf).__name__ == expected_class
    assert len(ours) == len(hf)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text


def test_from_dir_does_not_import_transformers(tiny_dirs):
    code = (
        "import sys\n"
        "from kevlard.tokenizer import Tokenizer\n"
        f"tok = Tokenizer.from_dir({str(tiny_dirs['tiny-qwen2'])!r})\n"
        "tok.decode(tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True))\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parent.parent)


def test_a_directory_without_tokenizer_json_is_a_value_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_load_tokenizer_falls_back_to_transformers_for_what_it_does_not_mirror(tiny_dirs, tmp_path):
    assert isinstance(load_tokenizer(tiny_dirs["tiny-qwen2"]), Tokenizer)
    path = tmp_path / "phi3"
    shutil.copytree(tiny_dirs["tiny-llama"], path)
    _edit_json(path / "config.json", lambda d: d.update(model_type="phi3"))  # a model type we don't mirror
    with pytest.raises(UnsupportedTokenizerError):
        Tokenizer.from_dir(path)
    fallback = load_tokenizer(path)
    assert type(fallback).__module__.startswith("transformers.")
    assert fallback.encode("Hello world!") == Tokenizer.from_dir(tiny_dirs["tiny-llama"]).encode("Hello world!")


def test_a_directory_without_tokenizer_files_says_so(tmp_path):
    """Not transformers' 'install sentencepiece or tiktoken', which names neither the directory nor
    what is missing."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=f"{tmp_path} has no tokenizer: none of tokenizer.json"):
        load_tokenizer(tmp_path)
