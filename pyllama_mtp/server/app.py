"""The FastAPI application: OpenAI-compatible endpoints over one Worker.

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
from ..llama import Llama
from .metrics import Metrics
from .scheduler import BatchWorker
from .stream_extras import DraftSpans, message_stats
from .worker import Job, Worker


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 1 << 20
    prefill_chunk: int = 128      # --parallel: prompt tokens per loop while other slots generate


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


_log = logging.getLogger("pyllama_mtp.server")

# Requests are checked strictly: a string is never read as a number or a bool, and every
# sampling option has OpenAI's range (or, for the extensions, llama.cpp's sensible one).
_STRICT = ConfigDict(extra="ignore", strict=True)
_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_JSON_DEPTH = 64          # deeper bodies are refused before validation


class _StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False        # a last chunk with the usage (OpenAI's stream_options)


class _Options(BaseModel):
    """Generation options shared by both endpoints; unknown OpenAI fields are ignored."""
    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
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
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)   # legacy: how many alternatives per token

    @property
    def n_logprobs(self) -> int | None:
        return self.logprobs


class ChatRequest(_Options):
    messages: list[dict] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

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


def _generation_kwargs(req: _Options, llm: Llama, settings: ServerSettings) -> dict:
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and not 1 <= max_tokens <= settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens must be in [1, {settings.max_tokens_limit}]", param="max_tokens")
    draft = req.draft
    if req.mtp is False:
        draft = 0
    return dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                min_p=req.min_p, repeat_penalty=req.repeat_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, stop=req.stop, seed=req.seed, draft=draft,
                accept=req.accept, logprobs=req.n_logprobs)


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


def create_app(llm: Llama, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="pyllama-mtp-server", docs_url=None, redoc_url=None)
    metrics = Metrics(settings.model_name)
    # --parallel > 1: continuous batching over the session's sequence slots
    worker = (BatchWorker(llm, metrics, prefill_chunk=settings.prefill_chunk) if llm.session.n_seq_max > 1
              else Worker(llm, metrics))
    app.state.worker = worker

    @app.on_event("shutdown")
    def _stop_worker():
        worker.stop()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        endpoint = request.url.path
        try:
            if settings.api_key and endpoint.startswith("/v1/"):
                given = request.headers.get("authorization", "")
                expected = f"Bearer {settings.api_key}"
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                   type_="authentication_error", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
                raise ApiError(413, f"request body larger than {settings.max_body_bytes} bytes")
            response = await call_next(request)
        except ApiError as e:
            response = e.response()
        except Exception as e:  # a bug: an OpenAI-shaped 500, counted like any response
            _log.exception("unhandled error on %s", endpoint)
            response = ApiError(500, f"internal server error ({type(e).__name__}); see the server log",
                                type_="server_error").response()
        metrics.request_done(endpoint if endpoint in _ROUTES else "other", response.status_code)
        return response

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

    def check(tokens_fn, kwargs) -> list[int]:
        try:
            tokens = llm.check_request(tokens_fn(), **kwargs)
        except ContextFullError as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
        except (InvalidArgumentError, ChatTemplateError, ValueError) as e:
            raise ApiError(400, str(e)) from None
        max_tokens = kwargs.get("max_tokens")
        if max_tokens is not None and len(tokens) + max_tokens > llm.n_ctx:
            raise ApiError(400, f"the prompt has {len(tokens)} tokens and the context holds {llm.n_ctx}, so "
                                f"max_tokens can be at most {llm.n_ctx - len(tokens)} (got {max_tokens})",
                           code="context_length_exceeded", param="max_tokens")
        return tokens

    lost_worker: list[str] = []   # why the model became unusable (an RPC worker was lost)

    async def run(tokens, kwargs, request: Request):
        """Async iterator over the worker's chunks for one job."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        options = {k: v for k, v in kwargs.items() if k != "max_tokens"}
        options["max_tokens"] = kwargs["max_tokens"]
        job = Job(tokens, options, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item))
        worker.submit(job)
        try:
            while True:
                item = await inbox.get()
                if item is Worker.DONE:
                    return
                if isinstance(item, RpcError):
                    lost_worker.append(str(item))   # the model is unusable from now on
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # a client that went away frees the worker at the next step

    def usage_extra(stats) -> dict:
        return {"drafted_tokens": stats.drafted, "accepted_tokens": stats.accepted}

    async def collect(tokens, kwargs, request, chat: bool):
        text, generated, finish, stats, lps, tops = [], [], "length", None, [], []
        try:
            async for item in run(tokens, kwargs, request):
                if hasattr(item, "text"):
                    text.append(item.text)
                    generated.extend(item.tokens)
                    lps.extend(item.logprobs or ())
                    tops.extend(item.top_logprobs or ())
                    finish = item.finish_reason or finish
                else:
                    stats = item
        except RpcError as e:
            raise ApiError(503, str(e), "server_error") from None
        except PmtpError as e:
            raise ApiError(400, str(e)) from None
        logprobs = logprobs_object(kwargs, generated, lps, tops, chat)
        return "".join(text), len(generated), finish, stats, logprobs

    def logprobs_object(kwargs, tokens, lps, tops, chat: bool, offset: int = 0):
        """The OpenAI logprobs object of these tokens, or None when the request did not ask."""
        if kwargs.get("logprobs") is None:
            return None
        pieces = llm.model.token_pieces
        alternatives = [[(pieces[t], lp) for t, lp in alts] for alts in tops]
        if chat:
            return openai_shapes.chat_logprobs([pieces[t] for t in tokens], lps, alternatives)
        return openai_shapes.completion_logprobs([pieces[t] for t in tokens], lps, alternatives, offset)

    def chunk_logprobs(kwargs, item, chat: bool, offset: int = 0):
        return logprobs_object(kwargs, item.tokens, item.logprobs or (), item.top_logprobs or (), chat, offset)

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

    async def tracked(items, tokens, req: _Options, make_chunk):
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
            tail["usage"] = openai_shapes.usage(len(tokens), n_generated, usage_extra(stats) if stats else None)
            yield tail

    def sse(events):
        async def body():
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        kwargs = _generation_kwargs(req, llm, settings)
        tokens = check(lambda: req.prompt, kwargs)
        cid, created = openai_shapes.new_id("cmpl"), int(time.time())
        if req.stream:
            def chunk(text, finish, logprobs):
                return openai_shapes.completion_chunk(cid, settings.model_name, created, text, finish, logprobs)

            async def events():
                offset = 0   # text offsets of streamed logprobs continue over the chunks
                async for item in tracked(run(tokens, kwargs, request), tokens, req, chunk):
                    if isinstance(item, dict):
                        yield item
                        continue
                    logprobs = chunk_logprobs(kwargs, item.chunk, False, offset)
                    if logprobs is not None:
                        offset += sum(len(t) for t in logprobs["tokens"])
                    yield item.extend(chunk(item.chunk.text, None, logprobs))
            return sse(events())
        text, n, finish, stats, logprobs = await collect(tokens, kwargs, request, chat=False)
        return openai_shapes.completion_response(cid, settings.model_name, created, text, finish, len(tokens), n,
                                                 logprobs=logprobs, extra_usage=usage_extra(stats))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        kwargs = _generation_kwargs(req, llm, settings)
        tokens = check(lambda: llm.chat_tokens(req.messages), kwargs)
        cid, created = openai_shapes.new_id("chatcmpl"), int(time.time())
        if req.stream:
            def chunk(text, finish, logprobs):
                delta = {} if finish else {"content": text}
                return openai_shapes.chat_chunk(cid, settings.model_name, created, delta, finish, logprobs)

            async def events():
                yield openai_shapes.chat_chunk(cid, settings.model_name, created,
                                               {"role": "assistant", "content": ""}, None)
                async for item in tracked(run(tokens, kwargs, request), tokens, req, chunk):
                    if isinstance(item, dict):
                        yield item
                        continue
                    logprobs = chunk_logprobs(kwargs, item.chunk, True) if item.chunk.tokens else None
                    if item.chunk.text or logprobs is not None:
                        yield item.extend(chunk(item.chunk.text, None, logprobs))
            return sse(events())
        text, n, finish, stats, logprobs = await collect(tokens, kwargs, request, chat=True)
        return openai_shapes.chat_response(cid, settings.model_name, created, text, finish, len(tokens), n,
                                           logprobs=logprobs, extra_usage=usage_extra(stats))

    return app
