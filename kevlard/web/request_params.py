"""Request parsing for the OpenAI routes: strict, every fault a 400 naming its `param`."""
from __future__ import annotations

import json
import math
import re
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from kevlard.api_types import Engine, SamplingParams
from kevlard.config import ServerConfig
from kevlard.web.errors import APIError


MAX_STOP_STRINGS = 4
CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool = False  # vLLM's extension: the generated token ids in the answer


async def read_json_body(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object; 413 past `max_bytes` (checked while reading, not only by header)."""
    too_large = APIError(f"Request body exceeds {max_bytes} bytes", status=413,
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as e:  # includes UnicodeDecodeError
        raise APIError(f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError("The request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # rare: the walk below runs only then (a body of MBs costs it)
        _reject_lone_surrogates(body)
    return body


# a surrogate can only come from a \uD800-\uDFFF escape (raw UTF-8 cannot hold one: it fails to decode)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_lone_surrogates(body: dict) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which is no Unicode text: no tokenizer
    or response can take it. 400, naming the top-level field it is in."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return  # escaped pairs (an emoji from a client that escapes non-ASCII): valid text
    except UnicodeEncodeError:
        pass
    stack: list = [(None, body)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                stack += [(field or key, key), (field or key, item)]
        elif isinstance(value, list):
            stack += [(field, item) for item in value]
        elif isinstance(value, str) and not _is_unicode(value):
            name = field if _is_unicode(field) else None
            raise APIError(f"'{name or 'a field name'}' holds a lone UTF-16 surrogate escape, which is not "
                           "valid Unicode", param=name, code="invalid_value")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def parse_chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise APIError("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise APIError("'messages' must be an array", param="messages", code="invalid_type")
    if not messages:
        raise APIError("'messages' must contain at least one message", param="messages",
                       code="empty_array")
    return [_chat_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _chat_message(message: Any, param: str) -> dict:
    if not isinstance(message, dict):
        raise APIError(f"'{param}' must be an object", param=param, code="invalid_type")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise APIError(f"'{param}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}",
                       param=f"{param}.role", code="invalid_value")
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):  # content parts: only text is supported
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise APIError(f"'{param}.content[{j}]' must be a text part",
                               param=f"{param}.content[{j}]", code="invalid_value")
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise APIError(f"'{param}.content' must be a string or an array of text parts",
                       param=f"{param}.content", code="invalid_type")
    # "developer" is OpenAI's newer name for "system", which every chat template knows.
    out = {"role": "system" if role == "developer" else role, "content": content}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def parse_completion_prompt(body: dict, tokenizer) -> list[int]:
    """`prompt`: a string, a list holding one string, token ids, or a list holding one list of ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) > 1 and (
            all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        raise APIError("Only one prompt per request is supported", param="prompt",
                       code="invalid_value")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("'prompt' must not be empty", param="prompt", code="invalid_value")
        return list(tokenizer.encode(prompt))
    if not isinstance(prompt, list):
        raise APIError("'prompt' must be a string or an array of token ids", param="prompt",
                       code="invalid_type")
    if not prompt:
        raise APIError("'prompt' must not be empty", param="prompt", code="invalid_value")
    vocab_size = len(tokenizer)
    for t in prompt:
        if not _is_int(t):
            raise APIError("'prompt' must be a string or an array of token ids", param="prompt",
                           code="invalid_type")
        if not 0 <= t < vocab_size:
            raise APIError(f"Token id {t} is outside the vocabulary (0..{vocab_size - 1})",
                           param="prompt", code="invalid_value")
    return list(prompt)


def parse_generation_request(body: dict, prompt_ids: list[int], *, chat: bool, engine: Engine,
                             server: ServerConfig) -> GenerationRequest:
    _reject_unsupported(body, chat)
    temperature = _number(body, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise _out_of_range("temperature", "between 0 and 2", temperature)
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise _out_of_range("top_p", "in (0, 1]", top_p)
    top_k = _integer(body, "top_k", 0)
    if top_k < -1:
        raise _out_of_range("top_k", ">= 0 (0 or -1: off)", top_k)
    seed = _integer(body, "seed", None)
    if seed is not None and not -(2 ** 63) <= seed < 2 ** 63:
        raise _out_of_range("seed", "a 64-bit integer", seed)
    stream = _boolean(body, "stream", False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise APIError("'stream_options' must be an object", param="stream_options",
                           code="invalid_type")
        include_usage = _boolean(options, "include_usage", False, param="stream_options.include_usage")
        if not stream:  # as OpenAI (and vLLM) answer: nothing would ever read them
            raise APIError("'stream_options' is only allowed when 'stream' is true", param="stream_options",
                           code="invalid_value")
    max_tokens = _max_tokens(body, prompt_ids, chat, engine, server)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=max(top_k, 0), seed=seed,
                            ignore_eos=_boolean(body, "ignore_eos", False))
    return GenerationRequest(prompt_ids=prompt_ids, params=params, stop=_stop(body), stream=stream,
                             include_usage=include_usage,
                             return_token_ids=_boolean(body, "return_token_ids", False))


def _max_tokens(body: dict, prompt_ids: list[int], chat: bool, engine: Engine,
                server: ServerConfig) -> int:
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    requested = _integer(body, name, None)
    if requested is not None and requested < 1:
        raise _out_of_range(name, ">= 1", requested)
    if requested is not None and requested > server.max_tokens_limit:
        raise _out_of_range(name, f"<= {server.max_tokens_limit}", requested)
    prompt_param = "messages" if chat else "prompt"
    context = engine.max_model_len
    prompt_limit = context - 1  # at least one token must fit after the prompt
    if server.max_prompt_tokens > 0:
        prompt_limit = min(prompt_limit, server.max_prompt_tokens)
    if len(prompt_ids) > prompt_limit:
        raise APIError(f"The prompt is {len(prompt_ids)} tokens long; at most {prompt_limit} "
                       f"are allowed (context length {context})", param=prompt_param,
                       code="context_length_exceeded")
    if not prompt_ids:
        raise APIError("The prompt is empty", param=prompt_param, code="invalid_value")
    room = context - len(prompt_ids)
    if requested is None:
        return min(server.default_max_tokens, room)
    if requested > room:
        raise APIError(f"This model's context length is {context} tokens; the prompt takes "
                       f"{len(prompt_ids)} and {name} asks for {requested}", param=name,
                       code="context_length_exceeded")
    return requested


def _reject_unsupported(body: dict, chat: bool) -> None:
    n = _integer(body, "n", 1)
    if n != 1:
        raise APIError("Only n=1 is supported", param="n", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise APIError(f"'{name}' is not supported (only 0)", param=name, code="unsupported_value")
    if body.get("logprobs") not in (None, False):
        raise APIError("'logprobs' is not supported", param="logprobs", code="unsupported_value")
    if body.get("top_logprobs") not in (None, 0):
        raise APIError("'top_logprobs' is not supported", param="top_logprobs",
                       code="unsupported_value")
    if body.get("logit_bias"):
        raise APIError("'logit_bias' is not supported", param="logit_bias", code="unsupported_value")
    if chat:
        if body.get("tools"):
            raise APIError("'tools' is not supported", param="tools", code="unsupported_value")
        response_format = body.get("response_format")
        if response_format is not None and response_format != {"type": "text"}:
            raise APIError("Only response_format {\"type\": \"text\"} is supported",
                           param="response_format", code="unsupported_value")
    else:
        if body.get("echo") not in (None, False):
            raise APIError("'echo' is not supported", param="echo", code="unsupported_value")
        if body.get("best_of") not in (None, 1):
            raise APIError("Only best_of=1 is supported", param="best_of", code="unsupported_value")
        if body.get("suffix"):
            raise APIError("'suffix' is not supported", param="suffix", code="unsupported_value")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError("'stop' must be a string or an array of strings", param="stop",
                       code="invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop",
                       code="invalid_value")
    return tuple(s for s in stop if s)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise APIError(f"'{name}' must be an integer, got {value!r}", param=name, code="invalid_type")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(f"'{name}' must be a number, got {value!r}", param=name, code="invalid_type")
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise APIError(f"'{name}' must be a finite number", param=name, code="invalid_value")
    return number


def _boolean(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"'{param or name}' must be a boolean, got {value!r}", param=param or name,
                       code="invalid_type")
    return value


def _out_of_range(name: str, rule: str, value: Any) -> APIError:
    return APIError(f"'{name}' must be {rule}, got {value!r}", param=name, code="invalid_value")
