"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions (both streamed or not), /v1/models.

Life of a request here: read and validate the JSON body (any fault is a 4xx naming `param`),
turn it into prompt token ids and SamplingParams, call `engine.generate`, and pull the first
delta *before* answering, so an engine that refuses (queue full, no route) gets a proper error
status instead of a 200 stream. Tokens then go through the incremental detokenizer (stop
strings) into one JSON answer or an SSE stream. Whatever ends the request early — a stop string,
a client that hangs up, an error — closes the engine's iterator, which aborts the request.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kevlard.api_types import Engine, EngineError, StopRequested, TokenDelta
from kevlard.config import Config
from kevlard.web import errors
from kevlard.web.detokenizer import IncrementalDetokenizer
from kevlard.web.errors import APIError
from kevlard.web.request_params import (GenerationRequest, parse_chat_messages, parse_completion_prompt,
                                         parse_generation_request, read_json_body)

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2
ABORT_TIMEOUT_S = 5.0  # how long closing the engine's iterator may take before we give up on it
CLIENT_GONE_STATUS = 499  # nobody reads it; keeps the access log honest


class OpenAIAPI:
    def __init__(self, engine: Engine, config: Config) -> None:
        self._engine = engine
        self._config = config
        self._created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", _guarded(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", _guarded(self.completions), methods=["POST"]),
            Route("/v1/models", _guarded(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", _guarded(self.model), methods=["GET"]),
        ]

    def _model_card(self) -> dict:
        return {"id": self._engine.model_name, "object": "model", "created": self._created,
                "owned_by": "kevlard", "max_model_len": self._engine.max_model_len}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._check_model({"model": request.path_params["model"]})
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json_body(request, self._config.server.max_body_bytes)
        self._check_model(body)
        messages = parse_chat_messages(body)
        # off the event loop: a few MB of prompt take seconds to tokenize, and every stream would stall
        prompt_ids = await anyio.to_thread.run_sync(self._apply_chat_template, messages)
        req = parse_generation_request(body, prompt_ids, chat=True, engine=self._engine,
                                       server=self._config.server)
        return await self._respond(request, req, _ChatFormat(f"chatcmpl-{uuid.uuid4().hex}",
                                                             self._engine.model_name))

    async def completions(self, request: Request) -> Response:
        body = await read_json_body(request, self._config.server.max_body_bytes)
        self._check_model(body)
        prompt_ids = await anyio.to_thread.run_sync(parse_completion_prompt, body, self._engine.tokenizer)
        req = parse_generation_request(body, prompt_ids, chat=False, engine=self._engine,
                                       server=self._config.server)
        return await self._respond(request, req, _CompletionFormat(f"cmpl-{uuid.uuid4().hex}",
                                                                   self._engine.model_name))

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            return
        if not isinstance(model, str):
            raise APIError("'model' must be a string", param="model", code="invalid_type")
        if model != self._engine.model_name:
            raise APIError(f"The model '{model}' does not exist", status=404, param="model",
                           code="model_not_found")

    def _apply_chat_template(self, messages: list[dict]) -> list[int]:
        try:
            result = self._engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template rejected these messages (jinja raise_exception etc.)
            raise APIError(f"The chat template rejected the messages: {e}", param="messages") from None
        return _token_ids(result)

    async def _respond(self, request: Request, req: GenerationRequest, fmt: "_Format") -> Response:
        gen = _Generation(self._engine, fmt.id, req)
        try:
            # The engine's refusal (EngineError) surfaces here, before any response is started.
            _, gone = await _until_disconnect(request, gen.start)
            if gone:
                return Response(status_code=CLIENT_GONE_STATUS)
            if req.stream:
                response = _EventStream(self._sse_events(gen, fmt, req))
                gen = None  # the stream owns it now
                return response
            text, gone = await _until_disconnect(request, gen.read_all)
            if gone:
                return Response(status_code=CLIENT_GONE_STATUS)
            answer = fmt.completion(text, gen.finish_reason, gen.usage())
            if req.return_token_ids:
                answer["choices"][0]["token_ids"] = gen.token_ids
            return JSONResponse(answer)
        finally:
            if gen is not None:
                await gen.close()

    async def _sse_events(self, gen: "_Generation", fmt: "_Format", req: GenerationRequest
                          ) -> AsyncIterator[str]:
        usage_field = {"usage": None} if req.include_usage else {}
        try:
            first = fmt.first_chunk()
            if first is not None:
                yield _sse({**first, **usage_field})
            async with aclosing(gen.pieces()) as pieces:
                async for piece in pieces:
                    yield _sse({**fmt.chunk(piece, None), **usage_field})
            yield _sse({**fmt.chunk("", gen.finish_reason), **usage_field})
            if req.include_usage:
                yield _sse({**fmt.chunk_header(), "choices": [], "usage": gen.usage()})
            yield "data: [DONE]\n\n"
        except EngineError as e:  # the status line is gone; tell the client inside the stream
            log.warning("request %s failed mid-stream: %r", fmt.id, e)
            yield _sse(errors.engine_error_body(e))
            yield "data: [DONE]\n\n"
        except Exception:
            log.exception("request %s failed mid-stream", fmt.id)
            yield _sse(errors.error_body("The server had an error while processing your request.",
                                         "server_error"))
            yield "data: [DONE]\n\n"
        finally:
            await gen.close()


class _Generation:
    """One request's engine iterator, turned into released text by the detokenizer."""

    def __init__(self, engine: Engine, request_id: str, req: GenerationRequest) -> None:
        self._engine = engine
        self._request_id = request_id
        self._req = req
        self._deltas: AsyncIterator[TokenDelta] | None = None
        self._first: TokenDelta | None = None
        self._detok = IncrementalDetokenizer(engine.tokenizer, req.stop, req.prompt_ids)
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.cached_tokens = 0

    async def start(self) -> None:
        self._deltas = self._engine.generate(self._request_id, self._req.prompt_ids, self._req.params)
        self._first = await self._next_delta()
        self.cached_tokens = self._first.num_cached_tokens or 0

    async def _next_delta(self) -> TokenDelta:
        try:
            return await self._deltas.__anext__()
        except StopAsyncIteration:  # the engine ended without saying why: treat as a natural end
            return TokenDelta(finish_reason="stop")

    async def pieces(self) -> AsyncIterator[str]:
        """Non-empty text pieces; sets `finish_reason`. Closes the engine iterator on a stop string."""
        delta, self._first = self._first, None
        while True:
            self.token_ids += delta.token_ids
            text = self._detok.add_tokens(delta.token_ids)
            if self._detok.stopped:
                self.finish_reason = "stop"
                await self.close(stop=True)  # ends the request in the engine, finished by a stop string
            elif delta.finish_reason is not None:
                self.finish_reason = delta.finish_reason
                text += self._detok.finish()
            if text:
                yield text
            if self.finish_reason is not None:
                return
            delta = await self._next_delta()

    async def read_all(self) -> str:
        async with aclosing(self.pieces()) as pieces:
            return "".join([piece async for piece in pieces])

    def usage(self) -> dict:
        prompt, completion = len(self._req.prompt_ids), self._detok.num_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    async def close(self, stop: bool = False) -> None:
        deltas, self._deltas = self._deltas, None
        if deltas is None or not hasattr(deltas, "aclose"):
            return
        # Shielded: this often runs because the request was cancelled (client gone).
        with anyio.move_on_after(ABORT_TIMEOUT_S, shield=True) as scope:
            try:
                if stop:  # counted as finished ("stop"), not as aborted
                    try:
                        await deltas.athrow(StopRequested())
                    except (StopAsyncIteration, StopRequested):
                        pass
                await deltas.aclose()
            except Exception:
                log.exception("closing the engine stream of %s failed", self._request_id)
        if scope.cancelled_caught:
            log.error("closing the engine stream of %s took over %.0f s", self._request_id,
                      ABORT_TIMEOUT_S)


class _Format:
    object_chunk = ""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())

    def chunk_header(self) -> dict:
        return {"id": self.id, "object": self.object_chunk, "created": self.created, "model": self.model}

    def first_chunk(self) -> dict | None:
        return None

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        raise NotImplementedError

    def completion(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        raise NotImplementedError


class _ChatFormat(_Format):
    object_chunk = "chat.completion.chunk"

    def first_chunk(self) -> dict:
        return {**self.chunk_header(), "choices": [{
            "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}]}

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if finish_reason is None else {}
        return {**self.chunk_header(), "choices": [{
            "index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def completion(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": finish_reason}], "usage": usage}


class _CompletionFormat(_Format):
    object_chunk = "text_completion"

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        return {**self.chunk_header(), "choices": [{
            "index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    def completion(self, text: str, finish_reason: str | None, usage: dict) -> dict:
        return {**self.chunk_header(), "choices": [{
            "index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


class _EventStream(StreamingResponse):
    """An SSE response that always closes its event generator, however the response ends.

    Starlette cancels the body when the client disconnects; if that happens while the generator
    waits at a `yield` it would otherwise stay open until garbage collection, and with it the
    engine's request.
    """

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.move_on_after(ABORT_TIMEOUT_S, shield=True):
                await self._events.aclose()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _token_ids(result) -> list[int]:
    """apply_chat_template's output as a flat id list: from a list, or a BatchEncoding (transformers 5)."""
    if hasattr(result, "keys") and "input_ids" in result:
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    result = list(result)
    if result and isinstance(result[0], (list, tuple)):
        result = list(result[0])
    return [int(t) for t in result]


async def _until_disconnect(request: Request, fn: Callable[[], Awaitable]) -> tuple[object, bool]:
    """Run `fn`, cancelling it if the client goes away. Returns (its result, whether the client left)."""
    result, error, gone = None, None, False
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            nonlocal gone
            while True:
                await anyio.sleep(DISCONNECT_POLL_S)
                if await request.is_disconnected():
                    gone = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            result = await fn()
        except Exception as e:  # re-raised below, unwrapped by the task group
            error = e
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result, gone


def _guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every outcome of an endpoint becomes a response in OpenAI's error shape; none crashes the server."""
    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except APIError as e:
            return errors.api_error_response(e)
        except EngineError as e:
            return errors.engine_error_response(e)
        except ClientDisconnect:
            return Response(status_code=CLIENT_GONE_STATUS)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return errors.internal_error_response()
    return run
