"""The OpenAI-compatible API over real HTTP (uvicorn on a free port), against a fake engine."""
from __future__ import annotations

import concurrent.futures
import json
import threading
from contextlib import contextmanager
from typing import Iterator

import httpx
import openai
import pytest

from kevlard.api_types import EngineDeadError, NoRouteError, QueueFullError
from kevlard.config import Config, ServerConfig
from kevlard.web.app import create_app
from kevlard.web.openai_api import _token_ids
from tests.live_server import serve_in_thread
from tests.web.fake_engine import FakeEngine

DEADLINE_S = 10.0


@contextmanager
def live_server(engine: FakeEngine, **server: object) -> Iterator[str]:
    """Serve create_app(engine, config) with uvicorn in a thread; yield its base URL."""
    with serve_in_thread(create_app(engine, Config(server=ServerConfig(**server)))) as url:
        yield url


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine) -> Iterator[httpx.Client]:
    with live_server(engine) as url, httpx.Client(base_url=url, timeout=DEADLINE_S) as c:
        yield c


def chat(content: str = "Hi", **extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None,
                        code: str | None = None, type: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == type
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# --- happy paths ----------------------------------------------------------------------------------

def test_models_lists_the_engine_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == "fake-model" and model["object"] == "model"
    assert model["owned_by"] == "kevlard" and model["max_model_len"] == 128
    assert isinstance(model["created"], int)


def test_chat_completion(client, engine):
    r = client.post("/v1/chat/completions", json=chat("Hi"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello world!"}
    assert choice["finish_reason"] == "stop"
    [call] = engine.calls
    expected_prompt = engine.tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert call.prompt_token_ids == expected_prompt
    assert call.request_id == body["id"]
    reply_tokens = len(engine.tokenizer.encode("Hello world!")) + 1  # + end of sequence
    assert body["usage"] == {"prompt_tokens": len(expected_prompt), "completion_tokens": reply_tokens,
                             "total_tokens": len(expected_prompt) + reply_tokens,
                             "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("prompt", ["Say hi", ["Say hi"], "ids", ["ids"]])
def test_completion_prompt_forms(client, engine, prompt):
    ids = engine.tokenizer.encode("Say hi")
    prompt = ids if prompt == "ids" else [ids] if prompt == ["ids"] else prompt
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello world!"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert engine.calls[-1].prompt_token_ids == ids
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_max_tokens_ends_with_length(client, engine):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
    body = r.json()
    assert body["choices"][0] == {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}
    assert body["usage"]["completion_tokens"] == 5


def test_sampling_params_reach_the_engine(client, engine):
    r = client.post("/v1/chat/completions", json=chat(
        temperature=0.5, top_p=0.9, top_k=40, seed=7, max_completion_tokens=9, n=1,
        presence_penalty=0, frequency_penalty=0.0, logprobs=False, user="u1"))
    assert r.status_code == 200, r.text
    p = engine.calls[-1].params
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.5, 0.9, 40, 7, 9)
    assert p.stop_token_ids == () and not p.ignore_eos


def test_defaults_follow_openai_and_config(engine):
    engine.max_model_len = 40
    with live_server(engine, default_max_tokens=16) as url:
        prompt = engine.tokenizer.encode("x" * 30)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 10})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt})
        assert r.status_code == 200, r.text
    first, second = engine.calls
    assert first.params.temperature == 1.0 and first.params.top_p == 1.0 and first.params.seed is None
    assert first.params.max_tokens == 16  # the configured default
    assert second.params.max_tokens == 10  # all the context has left


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", chat("Hi", stop=["d! S"])),
    ("/v1/completions", {"prompt": "Hi", "stop": "d! S"}),
])
def test_stop_string_split_across_tokens_aborts_the_request(engine, path, body):
    engine.reply = "Hello world! STOP and more text that is never sent"
    with live_server(engine) as url:
        r = httpx.post(url + path, json=body)
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert text == "Hello worl" and choice["finish_reason"] == "stop"
    tokens = engine.tokenizer.convert_ids_to_tokens(engine.tokenizer.encode(engine.reply))
    assert r.json()["usage"]["completion_tokens"] == tokens.index("ST") + 1
    assert engine.closed == [engine.calls[0].request_id]  # the engine saw its iterator closed


# --- streaming -------------------------------------------------------------------------------------

def test_streamed_chat_chunks_usage_and_done(engine):
    engine.reply = "Grüße, world!"
    engine.tokens_per_delta = 3
    with live_server(engine) as url:
        r = httpx.post(f"{url}/v1/chat/completions",
                       json=chat(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "fake-model"
        assert isinstance(c["created"], int)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert "".join(content) == "Grüße, world!" and all(content)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    n = len(engine.tokenizer.encode("Grüße, world!")) + 1
    assert chunks[-1]["usage"]["completion_tokens"] == n
    assert chunks[-1]["usage"]["total_tokens"] == n + chunks[-1]["usage"]["prompt_tokens"]


def test_streamed_completion_with_stop(engine):
    engine.reply = "Hello world! STOP more"
    with live_server(engine) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "stream": True, "stop": ["TO"]})
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world! S"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert engine.closed == [engine.calls[0].request_id]


def test_disconnecting_streaming_client_aborts_its_request(engine):
    engine.delay_s = 0.02
    engine.max_model_len = 8192
    body = chat(stream=True, ignore_eos=True, max_tokens=4000)  # minutes of tokens
    with live_server(engine, max_tokens_limit=8000) as url, httpx.Client(timeout=DEADLINE_S) as c:
        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data: ")
        # leaving the block closed the connection mid-stream
        assert engine.closed_event.wait(DEADLINE_S), "the engine's iterator was not closed"
        assert engine.closed == [engine.calls[0].request_id]
        assert c.post(f"{url}/v1/chat/completions", json=chat()).status_code == 200


def test_client_leaving_before_the_first_token_aborts_its_request(engine):
    engine.delay_s = 60  # queued, as it were, for a minute
    with live_server(engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=chat(stream=True), timeout=0.5)
        assert engine.closed_event.wait(DEADLINE_S), "the engine's iterator was not closed"
        assert engine.closed == [engine.calls[0].request_id]


def test_disconnecting_non_streaming_client_aborts_its_request(engine):
    engine.delay_s = 0.02
    engine.max_model_len = 8192
    with live_server(engine, max_tokens_limit=8000) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", timeout=0.5,
                       json={"prompt": "x", "ignore_eos": True, "max_tokens": 4000})
        assert engine.closed_event.wait(DEADLINE_S), "the engine's iterator was not closed"


# --- engine errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_with_retry_after(engine, stream):
    engine.refuse = QueueFullError("the queue is full")
    with live_server(engine) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(stream=stream))
        error = assert_openai_error(r, 429, type="rate_limit_exceeded", code="queue_full")
        assert error["message"] == "the queue is full"
        assert r.headers["retry-after"] == "1"
        engine.refuse = None
        assert httpx.post(f"{url}/v1/chat/completions", json=chat(stream=stream)).status_code == 200


def test_no_route_and_dead_engine_are_503(engine):
    with live_server(engine) as url:
        engine.refuse = NoRouteError()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert_openai_error(r, 503, type="service_unavailable", code="no_route")
        assert r.headers["retry-after"] == "5"
        engine.refuse = EngineDeadError("engine dead")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "stream": True})
        assert_openai_error(r, 503, type="service_unavailable", code="engine_dead")
        assert "retry-after" not in r.headers


def test_engine_failure_mid_stream_is_reported_in_the_stream(engine):
    engine.fail_after = 3
    with live_server(engine) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(stream=True))
        assert r.status_code == 200
        data = sse_data(r.text)
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["error"]["type"] == "server_error"
        r = httpx.post(f"{url}/v1/chat/completions", json=chat())
        assert_openai_error(r, 500, type="server_error")


def test_unexpected_exception_is_500_and_the_server_survives(engine):
    def broken(*args):
        raise RuntimeError("boom")

    with live_server(engine) as url:
        engine.generate, real = broken, engine.generate
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        error = assert_openai_error(r, 500, type="server_error")
        assert "boom" not in error["message"]
        engine.generate = real
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 200


# --- request validation ----------------------------------------------------------------------------

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = [
    (CHAT, {"messages": []}, "messages", None),
    (CHAT, {}, "messages", None),
    (CHAT, {"messages": "hi"}, "messages", None),
    (CHAT, {"messages": ["hi"]}, "messages[0]", None),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", None),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]", None),
    (CMPL, {"prompt": ""}, "prompt", None),
    (CMPL, {"prompt": []}, "prompt", None),
    (CMPL, {}, "prompt", None),
    (CMPL, {"prompt": 5}, "prompt", None),
    (CMPL, {"prompt": ["a", "b"]}, "prompt", None),
    (CMPL, {"prompt": [1, "a"]}, "prompt", None),
    (CMPL, {"prompt": [1, 99999]}, "prompt", None),
    (CMPL, {"prompt": "x", "model": 3}, "model", None),
    (CHAT, chat(temperature="hot"), "temperature", None),
    (CHAT, chat(temperature=2.5), "temperature", None),
    (CHAT, chat(temperature=True), "temperature", None),
    (CHAT, chat(top_p=0), "top_p", None),
    (CHAT, chat(top_p=1.5), "top_p", None),
    (CMPL, {"prompt": "x", "top_k": "x"}, "top_k", None),
    (CMPL, {"prompt": "x", "top_k": -2}, "top_k", None),
    (CMPL, {"prompt": "x", "seed": 1.5}, "seed", None),
    (CMPL, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    (CMPL, {"prompt": "x", "stop": [1]}, "stop", None),
    (CMPL, {"prompt": "x", "stop": 1}, "stop", None),
    (CHAT, chat(stream="yes"), "stream", None),
    (CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", None),
    (CHAT, chat(stream_options=[]), "stream_options", None),
    (CHAT, chat(stream_options={"include_usage": True}), "stream_options", None),  # without stream
    (CMPL, {"prompt": "x", "stream": False, "stream_options": {}}, "stream_options", None),
    (CHAT, chat(n=2), "n", None),
    (CMPL, {"prompt": "x", "n": "1"}, "n", None),
    (CHAT, chat(presence_penalty=0.5), "presence_penalty", None),
    (CMPL, {"prompt": "x", "frequency_penalty": 1}, "frequency_penalty", None),
    (CHAT, chat(logprobs=True), "logprobs", None),
    (CMPL, {"prompt": "x", "logprobs": 2}, "logprobs", None),
    (CMPL, {"prompt": "x", "echo": True}, "echo", None),
    (CHAT, chat(max_tokens=0), "max_tokens", None),
    (CHAT, chat(max_tokens="10"), "max_tokens", None),
    (CHAT, chat(max_completion_tokens=5000), "max_completion_tokens", None),
    (CMPL, {"prompt": "x", "max_tokens": 4097}, "max_tokens", None),
    (CMPL, {"prompt": "x", "ignore_eos": 1}, "ignore_eos", None),
    (CMPL, {"prompt": "x", "temperature": 10 ** 400}, "temperature", None),  # int too large for a float
    (CHAT, chat(top_p=-10 ** 400), "top_p", None),
    (CMPL, {"prompt": "x" * 200}, "prompt", "context_length_exceeded"),
    (CHAT, chat("x" * 200), "messages", "context_length_exceeded"),
    (CMPL, {"prompt": "x" * 100, "max_tokens": 50}, "max_tokens", "context_length_exceeded"),
    (CHAT, chat("x" * 80, max_tokens=50), "max_tokens", "context_length_exceeded"),
]


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[FakeEngine, httpx.Client]]:
    """One server for the many validation cases; they leave no state behind."""
    engine = FakeEngine()
    with live_server(engine) as url, httpx.Client(base_url=url, timeout=DEADLINE_S) as c:
        yield engine, c


@pytest.mark.parametrize("path,body,param,code", BAD_REQUESTS)
def test_bad_request_is_400_naming_its_param(shared, path, body, param, code):
    engine, client = shared
    calls = len(engine.calls)
    assert_openai_error(client.post(path, json=body), 400, param, code)
    assert len(engine.calls) == calls  # refused before reaching the engine
    good = chat() if path == CHAT else {"prompt": "x"}
    assert client.post(path, json=good).status_code == 200


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"",
                                     b'{"prompt": NaN}', b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"])
def test_malformed_body_is_400(shared, content):
    _, client = shared
    r = client.post(CMPL, content=content, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert client.post(CMPL, json={"prompt": "x"}).status_code == 200


@pytest.mark.parametrize("path,body,param", [
    (CMPL, {"prompt": "\ud800 hi"}, "prompt"),
    (CHAT, chat("a \udfff"), "messages"),
    (CMPL, {"prompt": "x", "stop": ["\ud800"]}, "stop"),
    (CMPL, {"prompt": "x", "model": "\ud800"}, "model"),
    (CMPL, {"prompt": "x", "\ud800": 1}, None),
])
def test_half_a_utf16_pair_is_400_naming_its_field(shared, path, body, param):
    """JSON can escape a lone surrogate ("\\ud800"), which no tokenizer or response can take."""
    _, client = shared
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param, "invalid_value")
    assert client.post(CMPL, json={"prompt": "x"}).status_code == 200
    # a whole pair, escaped as clients that escape non-ASCII send an emoji, is valid text
    r = client.post(CMPL, content=json.dumps({"prompt": "hi \U0001F600", "stop": ["\U0001F601"]}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body", [(CMPL, {"prompt": "a long prompt"}), (CHAT, chat("a long chat"))])
def test_tokenizing_a_prompt_does_not_hold_up_the_server(engine, path, body, monkeypatch):
    """Megabytes of prompt take seconds to tokenize: meanwhile /health and other requests are
    answered. The tokenizer here blocks until the test has seen /health answered; were it run on
    the event loop, /health would wait for it and the test would time out."""
    release = threading.Event()
    tokenizer = engine.tokenizer

    def slow(method):
        def run(text, *args, **kwargs):
            if "long" in str(text):
                assert release.wait(DEADLINE_S), "the tokenizer was never released"
            return method(text, *args, **kwargs)
        return run

    for name in ("encode", "apply_chat_template"):  # (the tokenizer is shared by the tests)
        monkeypatch.setattr(tokenizer, name, slow(getattr(tokenizer, name)))
    with live_server(engine) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{url}{path}", json=body, timeout=DEADLINE_S)
        try:
            assert httpx.get(f"{url}/health", timeout=DEADLINE_S / 2).status_code == 200
            assert httpx.post(f"{url}{CMPL}", json={"prompt": "x"}, timeout=DEADLINE_S / 2).status_code == 200
            assert not slow.done()
        finally:
            release.set()
        assert slow.result().status_code == 200


def test_prompt_limit_from_config(engine):
    with live_server(engine, max_prompt_tokens=10) as url:
        r = httpx.post(f"{url}{CMPL}", json={"prompt": "x" * 11})
        assert_openai_error(r, 400, "prompt", "context_length_exceeded")
        assert httpx.post(f"{url}{CMPL}", json={"prompt": "x" * 10}).status_code == 200


def test_unknown_model_is_404(client):
    r = client.post(CHAT, json={**chat(), "model": "gpt-9"})
    assert_openai_error(r, 404, "model", "model_not_found")
    assert client.post(CHAT, json=chat()).status_code == 200


def test_a_model_is_retrieved_by_its_id(client):
    """GET /v1/models/{id}, as the official client's models.retrieve() calls it."""
    model = client.get("/v1/models/fake-model").json()
    assert model["id"] == "fake-model" and model["object"] == "model"
    assert_openai_error(client.get("/v1/models/gpt-9"), 404, "model", "model_not_found")


def test_unknown_route_and_wrong_method(client):
    assert_openai_error(client.get("/v1/nope"), 404, type="not_found_error")
    assert_openai_error(client.post("/nope", json={}), 404, type="not_found_error")
    r = client.get(CHAT)
    assert_openai_error(r, 405)
    assert "POST" in r.headers["allow"]


def test_body_over_the_limit_is_413(engine):
    with live_server(engine, max_body_bytes=1024) as url:
        r = httpx.post(f"{url}{CMPL}", json={"prompt": "x" * 2000})
        assert_openai_error(r, 413, code="request_too_large")

        def chunks():  # no Content-Length: the limit holds while reading
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        r = httpx.post(f"{url}{CMPL}", content=chunks())
        assert_openai_error(r, 413, code="request_too_large")
        assert httpx.post(f"{url}{CMPL}", json={"prompt": "x"}).status_code == 200


def test_api_key_guards_v1_only(engine):
    with live_server(engine, api_key="sekrit") as url:
        assert_openai_error(httpx.get(f"{url}/v1/models"), 401, code="invalid_api_key")
        r = httpx.post(f"{url}{CHAT}", json=chat(), headers={"Authorization": "Bearer wrong"})
        assert_openai_error(r, 401, code="invalid_api_key")
        r = httpx.post(f"{url}{CHAT}", json=chat(), headers={"Authorization": "Basic sekrit"})
        assert_openai_error(r, 401, code="invalid_api_key")
        for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive (RFC 7235)
            ok = httpx.post(f"{url}{CHAT}", json=chat(), headers={"Authorization": f"{scheme} sekrit"})
            assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200


# --- the official client ---------------------------------------------------------------------------

def test_openai_client_chat_and_completions(engine):
    engine.reply = "Hello wörld! The end."
    with live_server(engine, api_key="k") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=DEADLINE_S)
        try:
            [model] = client.models.list().data
            assert model.id == "fake-model"
            out = client.chat.completions.create(model="fake-model", max_tokens=50,
                                                 messages=[{"role": "user", "content": "Hi"}])
            assert out.choices[0].message.content == "Hello wörld! The end."
            assert out.choices[0].finish_reason == "stop"
            assert out.usage.completion_tokens == len(engine.tokenizer.encode(engine.reply)) + 1

            stream = client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "Hi"}], stream=True,
                stop=[" The"], stream_options={"include_usage": True})
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Hello wörld!"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            assert chunks[-1].usage.completion_tokens > 0

            done = client.completions.create(model="fake-model", prompt="Hi", max_tokens=5)
            assert done.choices[0].text == "Hello" and done.choices[0].finish_reason == "length"
            streamed = client.completions.create(model="fake-model", prompt="Hi", stream=True)
            assert "".join(c.choices[0].text for c in streamed) == engine.reply

            engine.refuse = QueueFullError("busy")
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="fake-model", stream=True,
                                               messages=[{"role": "user", "content": "Hi"}])
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="other", prompt="Hi")
        finally:
            client.close()


# --- operations and helpers ------------------------------------------------------------------------

def test_health_ready_and_cluster(client, engine):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True}
    engine.ready = False
    r = client.get("/ready")
    assert r.status_code == 503 and r.json() == {"ready": False}
    client.post(CMPL, json={"prompt": "x"})
    assert client.get("/api/cluster").json()["requests"] == 1


def test_chat_template_output_forms():
    from transformers import BatchEncoding

    assert _token_ids([1, 2, 3]) == [1, 2, 3]
    assert _token_ids([[1, 2, 3]]) == [1, 2, 3]
    assert _token_ids({"input_ids": [1, 2], "attention_mask": [1, 1]}) == [1, 2]
    assert _token_ids(BatchEncoding({"input_ids": [[4, 5]]})) == [4, 5]
