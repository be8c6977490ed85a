"""The HTTP API: OpenAI-compatible routes, tokenizer routes, health, metrics and the chat page.

Handlers parse and validate into typed requests (``schemas.py``) and hand them to the engine; every client
mistake becomes a 4xx with an OpenAI-shaped body naming the cause. The model loads in a thread after the
server starts listening, so /health answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierlm.errors import TierlmError
from tierlm.serve import completions
from tierlm.serve.completions import ApiError
from tierlm.serve.engine import Engine
from tierlm.serve.metrics import Metrics
from tierlm.serve.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                  describe_validation_error, error_body)

log = logging.getLogger("tierlm.serve")
Body = TypeVar("Body", bound=BaseModel)


@dataclass
class ServeOptions:
    """Everything ``tierlm serve`` can be told; the defaults are the command's."""

    model: str | None = None  # checkpoint folder; None: the demo model
    device: str | None = None
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 32
    ctx: int | None = None  # tokens per sequence; None: the model's context
    max_waiting: int | None = None  # queue limit; None: 4 × max_batch
    chat_template: str | None = None  # None: the checkpoint's own; "v3", "r1"
    served_model_name: str | None = None  # None: "demo" or the checkpoint folder's name
    allow_origins: tuple[str, ...] = ()  # CORS; empty: off
    max_body_bytes: int = 8 << 20
    keepalive_s: float = 5.0  # SSE comment interval while no token comes
    shutdown_timeout_s: float = 30.0  # on SIGTERM, time in-flight requests get to finish
    loader: Callable[[], Any] | None = None  # loads the model (placement flags); None: tierlm.load(model, ...)

    @property
    def name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return "demo"
        path = Path(self.model).resolve()
        return path.stem if path.suffix == ".gguf" else path.name


class ServerState:
    """The engine once loaded, or why it is not: /health and every route look here."""

    def __init__(self, options: ServeOptions, metrics: Metrics):
        self.options, self.metrics = options, metrics
        self.engine: Engine | None = None
        self.error: str | None = None
        self.on_fatal = lambda: None  # the server sets this to stop itself when loading fails

    def load(self, model=None) -> None:
        """Load the model (unless given) and start the engine; on failure record why and stop the server."""
        o = self.options
        try:
            if model is None and o.loader is not None:
                model = o.loader()
            elif model is None:
                import tierlm

                model = tierlm.load(o.model, device=o.device, dtype=o.dtype)
            engine = Engine.start(model, name=o.name, max_batch=o.max_batch, ctx=o.ctx,
                                  max_waiting=o.max_waiting if o.max_waiting is not None else 4 * o.max_batch,
                                  chat_template=o.chat_template, events=self.metrics)
            # Render once so that a bad --chat-template fails now, not on every request.
            model.tokenizer.render_chat([{"role": "user", "content": "hi"}], template=o.chat_template)
        except Exception as e:  # noqa: BLE001 - any failure to load is reported and ends the server
            self.error = str(e) if isinstance(e, TierlmError) else f"{type(e).__name__}: {e}"
            log.error("could not load the model: %s", self.error)
            self.on_fatal()
            return
        self.metrics.bind(engine.scheduler, lambda: _tier_counts(getattr(model, "expert_stats", None)))
        self.engine = engine
        c = model.config
        log.info("serving %s (%s, %d layers, %d experts) on %s: batch %d, context %d, KV cache %d tokens",
                 o.name, c.model_type, c.num_hidden_layers, c.n_routed_experts, model.device, o.max_batch,
                 engine.ctx, engine.scheduler.kv_blocks_total * engine.scheduler.cache.block_size)

    def require_engine(self) -> Engine:
        if self.engine is None:
            if self.error:
                raise ApiError(503, f"the model failed to load: {self.error}", type="server_error")
            raise ApiError(503, "the model is still loading; retry when GET /health returns 200",
                           type="server_error", code="model_loading")
        return self.engine


class BodyTooLarge(Exception):
    pass


class LimitBody:
    """Refuse request bodies over ``max_bytes`` (413): by Content-Length up front, or while a chunked body
    streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse(error_body(f"the request body is larger than {self.max_bytes} bytes",
                                               code="body_too_large"), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


def create_app(options: ServeOptions, model=None, metrics: Metrics | None = None) -> FastAPI:
    """The ASGI app. ``model``: an already loaded model (tests); otherwise it is loaded in a thread at startup."""
    state = ServerState(options, metrics or Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, args=(model,), name="tierlm-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()  # requests still in flight after the grace period get an error

    app = FastAPI(title="tierlm", version=completions.__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.tierlm = state

    def require_key(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), options.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    keyed = [Depends(require_key)]

    # ------------------------------------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_, e):
        return JSONResponse(error_body(f"the request body is larger than {options.max_body_bytes} bytes",
                                       code="body_too_large"), status_code=413)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ()))
        return JSONResponse(error_body(f"{loc}: {err.get('msg', 'invalid request')}", param=loc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error ({type(e).__name__}); the server log has details",
                                       "server_error"), status_code=500)

    async def parse(request: Request, kind: type[Body]) -> Body:
        raw = await request.body()
        try:
            obj = json.loads(raw)
            json.dumps(obj, ensure_ascii=False).encode()  # lone surrogates ("\ud800") cannot reach the tokenizer
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(obj, dict):
            raise ApiError(400, f"the body must be a JSON object, not {type(obj).__name__}")
        try:
            return kind.model_validate(obj)
        except ValidationError as e:
            message, param = describe_validation_error(e)
            raise ApiError(400, message, param=param) from None

    # ------------------------------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        if state.engine is not None:
            return {"status": "ok"}
        status = {"status": "failed", "error": state.error} if state.error else {"status": "loading"}
        return JSONResponse(status, status_code=503)

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [_model_card(state.require_engine())]}

    @app.get("/v1/models/{model_id:path}", dependencies=keyed)
    async def model_card(model_id: str):
        engine = state.require_engine()
        completions.check_model(engine, model_id)
        return _model_card(engine)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request):
        engine = state.require_engine()
        job = await completions.chat_job(engine, await parse(request, ChatCompletionRequest))
        return await _respond(engine, job, request)

    @app.post("/v1/completions", dependencies=keyed)
    async def text_completions(request: Request):
        engine = state.require_engine()
        job = await completions.completion_job(engine, await parse(request, CompletionRequest))
        return await _respond(engine, job, request)

    async def _respond(engine: Engine, job: completions.Job, request: Request):
        sub = completions.submit(engine, job)
        if job.stream:
            # Starlette closes the generator when the client disconnects; its ``finally`` cancels the request.
            return StreamingResponse(completions.stream(engine, job, sub, options.keepalive_s),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, sub))
        try:
            return await completions.collect(engine, job, sub)
        finally:
            watcher.cancel()
            sub.cancel()

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(request: Request):
        engine = state.require_engine()
        body = await parse(request, TokenizeRequest)
        completions.check_model(engine, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either 'prompt' (a string) or 'messages' (a chat)", param="prompt")
        tok = engine.tokenizer
        try:
            if body.prompt is not None:
                ids = await asyncio.to_thread(tok.encode, body.prompt, add_bos=body.add_special_tokens)
            else:
                ids = await asyncio.to_thread(tok.encode_chat, [m.as_dict() for m in body.messages],
                                              add_generation_prompt=body.add_generation_prompt,
                                              template=engine.chat_template)
        except TierlmError as e:
            raise ApiError(400, str(e)) from None
        return {"count": len(ids), "max_model_len": engine.ctx, "tokens": ids}

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(request: Request):
        engine = state.require_engine()
        body = await parse(request, DetokenizeRequest)
        completions.check_model(engine, body.model)
        try:
            return {"prompt": engine.tokenizer.decode(body.tokens)}
        except TierlmError as e:
            raise ApiError(400, str(e), param="tokens") from None

    @app.get("/metrics", dependencies=keyed)
    async def metrics_route():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # The chat page needs no key to load (a browser cannot attach one to a page load); it asks for the key
    # and sends it with its API calls.
    static = Path(str(resources.files("tierlm.serve") / "static"))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(static / "index.html")

    app.mount("/static", StaticFiles(directory=static), name="static")

    if options.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allow_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(LimitBody, max_bytes=options.max_body_bytes)
    return app


async def _cancel_on_disconnect(request: Request, sub) -> None:
    """Cancel ``sub`` when the client of a non-streaming request goes away (its body has been read, so the
    next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            sub.cancel()
            return


def _tier_counts(stats) -> dict:
    """Per-tier totals of the model's ``TierStats`` for the metrics hook (none when experts are not tiered)."""
    if stats is None:
        return {}
    return {t: {"hits": n, "bytes_read": stats.bytes_read.get(t, 0)} for t, n in stats.hits.items()}


def _model_card(engine: Engine) -> dict[str, Any]:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "tierlm", "root": engine.name,
            "max_model_len": engine.ctx}
