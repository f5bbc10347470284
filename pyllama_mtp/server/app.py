"""The FastAPI application: OpenAI-compatible endpoints over one Scheduler.

Every error a client can cause comes back as a 4xx with an OpenAI-style error
object; the server never answers 500 for bad input and never dies of it.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import openai_shapes
from ..chat import ChatTemplateError
from ..errors import ContextFullError, InvalidArgumentError, PmtpError, RpcError
from ..config import MAX_TOP_LOGPROBS
from ..llama import Llama
from ..options import GenerationOptions, PreparedCall
from ..sequence import ChunkCollector
from ..speculative import GenerationStats
from .metrics import Metrics
from .scheduler import DONE, Job, Scheduler, ShuttingDown
from .stream_extras import DraftSpans, message_stats


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 1 << 20
    prefill_chunk: int = 128      # --parallel: prompt tokens per loop while other slots generate
    max_queue: int = 256          # requests waiting beyond this get 503 + Retry-After
    request_timeout: float | None = 600.0   # seconds a request may take in all (None: no limit)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)


class RequestTimeout(Exception):
    """The request ran longer than --request-timeout."""


class ClientLeft(Exception):
    """A non-streaming request's client disconnected before the answer was ready."""


_POLL_S = 0.25    # how often a waiting non-streaming request checks that its client is still there


def _error_for(e: Exception) -> ApiError:
    """The OpenAI error for an exception raised while a request runs."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e), "server_error", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(e, RequestTimeout):
        return ApiError(504, str(e), "server_error", code="timeout")
    if isinstance(e, ClientLeft):   # nobody reads it; 499 (client closed request) is what /metrics counts
        return ApiError(499, str(e), "invalid_request_error", code="client_closed_request")
    if isinstance(e, RpcError):
        return ApiError(503, str(e), "server_error")
    if isinstance(e, PmtpError):
        return ApiError(400, str(e))
    _log.error("unhandled error while generating", exc_info=e)
    return ApiError(500, f"internal server error ({type(e).__name__}); see the server log", "server_error")


_log = logging.getLogger("pyllama_mtp.server")

# Requests are checked strictly: a string is never read as a number or a bool, and every
# sampling option has OpenAI's range (or, for the extensions, llama.cpp's sensible one).
_STRICT = ConfigDict(extra="ignore", strict=True)
_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_JSON_DEPTH = 64          # deeper bodies are refused before validation
_MAX_PROMPTS = 64             # prompts in one /v1/completions request


class _StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False        # a last chunk with the usage (OpenAI's stream_options)


class _Options(BaseModel):
    """Generation options shared by both endpoints; unknown OpenAI fields are ignored. A
    sampling field left out takes the library's default (``GenerationOptions``)."""
    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = Field(default=None, max_length=16)
    seed: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = 1
    # extensions
    mtp: bool | None = None
    draft: int | Literal["auto"] | None = None
    accept: Literal["match", "rejection"] | None = None


class CompletionRequest(_Options):
    # one prompt (text or token ids), or a list of prompts as OpenAI's API takes them
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)   # legacy: alternatives per token

    @property
    def n_logprobs(self) -> int | None:
        return self.logprobs


class ChatRequest(_Options):
    messages: list[dict] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[dict]) -> list[dict]:
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in _ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        return messages

    @property
    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _json_depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > _MAX_JSON_DEPTH:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                    "frequency_penalty")


def _generation_options(req: _Options, settings: ServerSettings) -> GenerationOptions:
    """The request's options; what it leaves out takes GenerationOptions' defaults."""
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and not 1 <= max_tokens <= settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens must be in [1, {settings.max_tokens_limit}]", param="max_tokens")
    given = {name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None}
    try:
        return GenerationOptions(max_tokens=max_tokens, stop=req.stop, seed=req.seed, draft=req.draft, mtp=req.mtp,
                                 accept=req.accept, logprobs=req.n_logprobs, **given)
    except InvalidArgumentError as e:
        raise ApiError(400, str(e)) from None


# The chat page (static files shipped in the package; no build step, nothing from a CDN).
_STATIC = Path(__file__).with_name("static")
_STATIC_FILES = {"chat.js": "text/javascript", "chat.css": "text/css", "markdown.js": "text/javascript"}
# The page only talks to this server and never runs inline script: even text that got
# into the DOM as markup could not execute.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# /metrics counts requests per route; any other path counts as "other" (no label per URL).
_ROUTES = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"} |
                    {f"/static/{name}" for name in _STATIC_FILES})


class _Guard:
    """ASGI middleware in front of every route: the API key and the body size, checked
    before the app sees the request; every response counted in /metrics by route and
    status; an unhandled error answered with an OpenAI-shaped 500 (and counted). Plain ASGI
    (not BaseHTTPMiddleware) so a handler sees its client disconnect."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    def _refusal(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if self.settings.api_key and scope["path"].startswith("/v1/"):
            expected = f"Bearer {self.settings.api_key}"
            if not hmac.compare_digest(headers.get("authorization", "").encode(), expected.encode()):
                return ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                type_="authentication_error", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            return ApiError(413, f"request body larger than {self.settings.max_body_bytes} bytes")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        except Exception as e:
            _log.error("unhandled error on %s", scope["path"], exc_info=e)
            if status:       # the response had started; nothing more can be said to this client
                raise
            error = ApiError(500, f"internal server error ({type(e).__name__}); see the server log",
                             type_="server_error")
            await error.response()(scope, receive, send_counted)
        finally:
            path = scope["path"]
            self.metrics.request_done(path if path in _ROUTES else "other", status[0] if status else 500)


def create_app(llm: Llama, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="pyllama-mtp-server", docs_url=None, redoc_url=None)
    metrics = Metrics(settings.model_name)
    # --parallel > 1: continuous batching over the session's sequence slots
    worker = Scheduler(llm, metrics, prefill_chunk=settings.prefill_chunk)
    app.state.worker = worker

    @app.on_event("shutdown")
    def _stop_worker():
        worker.stop()

    app.add_middleware(_Guard, settings=settings, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return ApiError(400, f"invalid request: {where}: {first.get('msg', 'bad value')}", param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), type_="invalid_request_error").response()

    async def parse(request: Request, model_cls):
        body = await request.body()
        if len(body) > settings.max_body_bytes:
            raise ApiError(413, f"request body larger than {settings.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        except RecursionError:
            data = None
            depth = _MAX_JSON_DEPTH + 1
        else:
            depth = _json_depth(data)
        if depth > _MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested deeper than {_MAX_JSON_DEPTH} levels")
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ApiError(400, f"invalid request: {where}: {first['msg']}", param=where) from None
        if req.model is not None and req.model != settings.model_name:
            raise ApiError(404, f"model {req.model!r} not found; this server serves {settings.model_name!r}",
                           code="model_not_found", param="model")
        return req

    def check(tokens_fn, options: GenerationOptions) -> PreparedCall:
        try:
            call = llm.prepare_options(tokens_fn(), options)
        except ContextFullError as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
        except (InvalidArgumentError, ChatTemplateError, ValueError) as e:
            raise ApiError(400, str(e)) from None
        n, max_tokens = len(call.tokens), call.max_tokens
        if max_tokens is not None and n + max_tokens > llm.n_ctx:
            raise ApiError(400, f"the prompt has {n} tokens and the context holds {llm.n_ctx}, so "
                                f"max_tokens can be at most {llm.n_ctx - n} (got {max_tokens})",
                           code="context_length_exceeded", param="max_tokens")
        return call

    lost_worker: list[str] = []   # why the model became unusable (an RPC worker was lost)

    def admit() -> None:
        """Refuse a request the queue has no room for (before any response starts)."""
        waiting = worker.queued()
        if waiting >= settings.max_queue:
            raise ApiError(503, f"the server is busy: {waiting} requests are waiting; retry later",
                           "server_error", code="server_busy", headers={"Retry-After": "1"})

    async def run(call: PreparedCall, request: Request, watch_client: bool):
        """Async iterator over the worker's chunks for one job. ``watch_client``: a
        non-streaming request checks that its client is still connected while it waits
        (a stream's disconnect cancels it by itself); either way a client that left ends
        the job at the worker's next step."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        job = Job(call, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item))
        deadline = None if settings.request_timeout is None else loop.time() + settings.request_timeout
        worker.submit(job)
        next_check = loop.time() + _POLL_S
        try:
            while True:
                # checked every _POLL_S whether chunks keep coming or not
                if loop.time() >= next_check:
                    next_check = loop.time() + _POLL_S
                    if watch_client and await request.is_disconnected():
                        raise ClientLeft("the client disconnected before the answer was ready")
                    if deadline is not None and loop.time() > deadline:
                        raise RequestTimeout(f"the request ran longer than {settings.request_timeout:g} s "
                                             f"(--request-timeout)")
                    if worker.shutdown_at is not None and time.monotonic() > worker.shutdown_at:
                        raise ShuttingDown("the server shut down before this request finished")
                try:
                    item = await asyncio.wait_for(inbox.get(), _POLL_S)
                except asyncio.TimeoutError:
                    continue
                if item is DONE:
                    return
                if isinstance(item, RpcError):
                    lost_worker.append(str(item))   # the model is unusable from now on
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # a client that went away frees the worker at the next step

    async def collect(call: PreparedCall, request, chat: bool):
        """A request that does not stream: (text, tokens generated, finish reason, stats,
        logprobs object)."""
        got, stats = ChunkCollector(), None
        try:
            async for item in run(call, request, watch_client=True):
                if hasattr(item, "text"):
                    got.add(item)
                else:
                    stats = item
        except Exception as e:
            raise _error_for(e) from None
        logprobs = (openai_shapes.logprobs_object(llm.model.token_pieces, got.tokens, got.logprobs,
                                                  got.top_logprobs, chat) if call.with_logprobs else None)
        return got.text, len(got.tokens), got.finish_reason or "length", stats, logprobs

    def chunk_logprobs(call: PreparedCall, item, chat: bool, offset: int = 0):
        """A streamed chunk's logprobs object, or None when the request did not ask."""
        if not call.with_logprobs:
            return None
        return openai_shapes.logprobs_object(llm.model.token_pieces, item.tokens, item.logprobs or (),
                                             item.top_logprobs or (), chat, offset)

    @app.get("/health")
    async def health():
        if lost_worker:
            return JSONResponse({"status": "error", "reason": lost_worker[0]}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "pyllama-mtp",
                                            "x_pmtp": {"mtp": llm.draft_max > 0, "draft_max": llm.draft_max,
                                                       "draft_default": llm.draft, "n_ctx": llm.n_ctx}}]}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(_STATIC / "index.html", media_type="text/html", headers=_PAGE_HEADERS)

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static(name: str):
        if name not in _STATIC_FILES:
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(_STATIC / name, media_type=_STATIC_FILES[name], headers=_PAGE_HEADERS)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    class _Piece:
        """A worker chunk on its way into an SSE chunk, with its draft spans."""
        def __init__(self, chunk, spans: DraftSpans):
            self.chunk, self.spans = chunk, spans

        def extend(self, event: dict) -> dict:
            event["x_pmtp"] = self.spans.take_text(self.chunk.text)
            return event

    async def tracked(items, call: PreparedCall, req: _Options, make_chunk):
        """A stream's worker items as _Piece objects, then (as dicts) the last chunk, carrying
        the finish reason and the message's ``x_pmtp.stats``, and the usage chunk when
        ``stream_options.include_usage`` asks for it."""
        spans = DraftSpans(llm.model.token_pieces)
        t_request, t_first, first_tokens = time.perf_counter(), None, 0
        n_generated, finish, stats = 0, None, None
        async for item in items:
            if not hasattr(item, "text"):
                stats = item
                continue
            spans.add_tokens(item.tokens, item.from_draft)
            if t_first is None and item.tokens:
                t_first, first_tokens = time.perf_counter(), len(item.tokens)
            n_generated += len(item.tokens)
            finish = item.finish_reason or finish
            yield _Piece(item, spans)
        figures = message_stats(stats, n_generated, t_request, t_first, time.perf_counter(), first_tokens)
        if finish is not None:
            last = make_chunk("", finish, None)
            last["x_pmtp"] = {**spans.take_text(""), "stats": figures}
            yield last
        if req.stream_options is not None and req.stream_options.include_usage:
            tail = make_chunk("", None, None)
            tail["choices"] = []
            tail["usage"] = openai_shapes.usage(len(call.tokens), n_generated, openai_shapes.draft_usage(stats))
            yield tail

    def sse(events, endpoint: str):
        async def body():
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
            except Exception as e:   # the response has started: the error goes in the stream
                error = _error_for(e)
                metrics.stream_error(endpoint, error.status)
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    async def completions_of_prompts(req: CompletionRequest, options: GenerationOptions, request: Request) -> dict:
        """A list of prompts: each runs as its own job (side by side with --parallel), one
        choice each, in order; usage sums them."""
        if req.stream:
            raise ApiError(400, "stream: true takes one prompt; send a list of prompts without stream",
                           param="prompt")
        if len(req.prompt) > _MAX_PROMPTS:
            raise ApiError(400, f"at most {_MAX_PROMPTS} prompts per request, got {len(req.prompt)}", param="prompt")
        every = [check(lambda p=p: p, options) for p in req.prompt]
        admit()
        cid, created = openai_shapes.new_id("cmpl"), int(time.time())
        done = await asyncio.gather(*(collect(c, request, chat=False) for c in every), return_exceptions=True)
        failed = [d for d in done if isinstance(d, BaseException)]
        if failed:
            raise failed[0]
        counted = [stats for _, _, _, stats, _ in done if stats is not None]
        total = GenerationStats(drafted=sum(s.drafted for s in counted), accepted=sum(s.accepted for s in counted))
        return openai_shapes.completions_response(
            cid, settings.model_name, created, [(text, finish, lps) for text, _, finish, _, lps in done],
            sum(len(c.tokens) for c in every), sum(n for _, n, _, _, _ in done),
            extra_usage=openai_shapes.draft_usage(total))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        options = _generation_options(req, settings)
        if not isinstance(req.prompt, str) and req.prompt and all(isinstance(p, (str, list)) for p in req.prompt):
            return await completions_of_prompts(req, options, request)
        call = check(lambda: req.prompt, options)
        admit()
        cid, created = openai_shapes.new_id("cmpl"), int(time.time())
        if req.stream:
            def chunk(text, finish, logprobs):
                return openai_shapes.completion_chunk(cid, settings.model_name, created, text, finish, logprobs)

            async def events():
                offset = 0   # text offsets of streamed logprobs continue over the chunks
                async for item in tracked(run(call, request, watch_client=False), call, req, chunk):
                    if isinstance(item, dict):
                        yield item
                        continue
                    logprobs = chunk_logprobs(call, item.chunk, False, offset)
                    if logprobs is not None:
                        offset += sum(len(t) for t in logprobs["tokens"])
                    yield item.extend(chunk(item.chunk.text, None, logprobs))
            return sse(events(), request.url.path)
        text, n, finish, stats, logprobs = await collect(call, request, chat=False)
        return openai_shapes.completion_response(cid, settings.model_name, created, text, finish, len(call.tokens), n,
                                                 logprobs=logprobs, extra_usage=openai_shapes.draft_usage(stats))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        options = _generation_options(req, settings)
        call = check(lambda: llm.chat_tokens(req.messages), options)
        admit()
        cid, created = openai_shapes.new_id("chatcmpl"), int(time.time())
        if req.stream:
            def chunk(text, finish, logprobs):
                delta = {} if finish else {"content": text}
                return openai_shapes.chat_chunk(cid, settings.model_name, created, delta, finish, logprobs)

            async def events():
                yield openai_shapes.chat_chunk(cid, settings.model_name, created,
                                               {"role": "assistant", "content": ""}, None)
                async for item in tracked(run(call, request, watch_client=False), call, req, chunk):
                    if isinstance(item, dict):
                        yield item
                        continue
                    logprobs = chunk_logprobs(call, item.chunk, True) if item.chunk.tokens else None
                    if item.chunk.text or logprobs is not None:
                        yield item.extend(chunk(item.chunk.text, None, logprobs))
            return sse(events(), request.url.path)
        text, n, finish, stats, logprobs = await collect(call, request, chat=True)
        return openai_shapes.chat_response(cid, settings.model_name, created, text, finish, len(call.tokens), n,
                                           logprobs=logprobs, extra_usage=openai_shapes.draft_usage(stats))

    return app
