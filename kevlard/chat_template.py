"""Chat templates without transformers: loading, choosing and rendering them as transformers 5 does.

A port of transformers/utils/chat_template_utils.py and of the chat-template half of
`apply_chat_template`: messages are normalised to plain dicts and rendered in a jinja2 sandbox
configured like transformers'. `Tokenizer.apply_chat_template` is the way in; it tokenizes what
this module renders.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

# apply_chat_template options of transformers' that kevlard's tokenizer does not implement.
_UNSUPPORTED_CHAT_OPTIONS = ("padding", "truncation", "max_length", "return_tensors", "return_assistant_tokens_mask",
                             "sanitize_control_tokens", "tokenizer_kwargs")


def read_template_files(path: Path) -> str | dict[str, str] | None:
    """chat_template.jinja and additional_chat_templates/*.jinja, as from_pretrained reads them; None if absent."""
    templates = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "additional_chat_templates").is_dir():
        for file in (path / "additional_chat_templates").glob("*.jinja"):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if not templates:
        return None
    return templates["default"] if list(templates) == ["default"] else templates


def select_template(templates: str | dict[str, str] | None, chat_template: str | None = None,
                    tools: list | None = None) -> str:
    """The template to render: a named one, the tool-use or default one, or `chat_template` itself."""
    if isinstance(templates, dict):
        if chat_template is not None and chat_template in templates:
            return templates[chat_template]
        if chat_template is None:
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError("This model has multiple chat templates with no default specified; "
                             f"pass one of {sorted(templates)} as chat_template")
    elif chat_template is None:
        if templates is None:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set "
                             "and no template argument was passed")
        return templates
    return chat_template


def reject_unsupported_options(kwargs: dict) -> None:
    """Raise for a transformers option we do not implement; drop the ones that are merely off."""
    for option in _UNSUPPORTED_CHAT_OPTIONS:
        if kwargs.get(option):
            raise ValueError(f"apply_chat_template: {option} is not supported by kevlard's tokenizer")
        kwargs.pop(option, None)


def render_conversations(template: str, messages, tools, documents, continue_final_message: bool | str,
                         add_generation_prompt: bool, template_kwargs: dict) -> tuple[list[str], bool]:
    """`messages` (one conversation or a batch of them) rendered; the texts, and whether it was a batch."""
    if isinstance(messages, (list, tuple)) and not messages:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    batched = isinstance(messages, (list, tuple)) and (
        isinstance(messages[0], (list, tuple)) or hasattr(messages[0], "messages"))
    conversations = [_normalize_messages(c) for c in (messages if batched else [messages])]
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible")
    rendered = [_render(template, chat, tools, documents, continue_final_message, add_generation_prompt,
                        template_kwargs) for chat in conversations]
    return rendered, batched


# --- transformers/utils/chat_template_utils.py, without transformers ------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _render(template: str, chat: list[dict], tools, documents, continue_final_message: bool | str,
            add_generation_prompt: bool, template_kwargs: dict) -> str:
    """One conversation through render_jinja_template (no assistant-token mask)."""
    compiled = _compile_template(template)
    if tools is not None:
        tools = [tool if isinstance(tool, dict) else _json_schema(tool) for tool in tools]
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    tools, documents, template_kwargs = _plain(tools), _plain(documents), _plain(template_kwargs)
    chat = _alias_reasoning(_plain(chat))
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1].get(field)
        if final is None:
            raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
        if not any(f in template for f in fields):
            raise ValueError(f'continue_final_message is set to "{field}" but this is not an accepted field '
                             "in the chat_template")
        if isinstance(final, (list, tuple)):
            for block in reversed(final):
                if "text" in block:
                    final = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message is set but we could not find any text to continue")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    rendered = compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **template_kwargs)
    if continue_final_message:
        if final.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ValueError("continue_final_message is set but the final message does not appear in the chat "
                             "after applying the chat template")
        tag_at = rendered.rindex(_CONTINUE_TAG.strip())
        if rendered[tag_at:tag_at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:tag_at]
        else:
            rendered = rendered[:tag_at].rstrip()
    return rendered


def _json_schema(tool):
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        from transformers.utils import (
            get_json_schema,  # rare: a Python function given as a tool
        )

        return get_json_schema(tool)
    raise ValueError("Tools should either be a JSON schema, or a callable function with type hints "
                     "and a docstring suitable for auto-conversion to a schema.")


def _to_dicts(value: Any) -> Any:
    """Message objects (dataclasses, pydantic models), at any depth, to dicts."""
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


def _normalize_messages(conversation: Any) -> list[dict]:
    """Messages as dicts, without the keys whose value is None (_normalize_chat_messages)."""
    messages = _to_dicts(getattr(conversation, "messages", conversation))
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
    return [{k: v for k, v in message.items() if v is not None} for message in messages]


def _plain(value: Any) -> Any:
    """Only plain JSON types reach the sandbox (_plain_template_data)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    numpy = sys.modules.get("numpy")  # a numpy scalar can only exist if numpy is imported
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list) -> list:
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


@lru_cache(maxsize=16)
def _compile_template(template: str):
    """The template in a sandbox set up like transformers' _cached_compile_jinja_template."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """Parses {% generation %}...{% endgeneration %} and renders the body (transformers' AssistantTracker)."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates want plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed attributes (no reaching CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
