"""The HTTP API: OpenAI's completions, chat and models routes, plus classify, adapters, health, metrics.

``create_app(engine)`` returns the FastAPI app; :class:`BackgroundServer` runs it with uvicorn
on a thread (tests, benchmarks, notebooks). Handlers only validate, tokenize (in a worker
thread) and await the engine's futures: model work never runs on the event loop.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status for a bad request (unknown model, too many tokens, malformed JSON, an adapter that fails
to load) and 401 without the API key; the server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from adapterkit.errors import AdapterKitError, AdapterNotFoundError, HubError
from adapterkit.errors import PoolFullError
import adapterkit.serve.metrics as prom
from adapterkit.serve.engine import (
    ClassifyJob,
    Completion,
    ContextLengthError,
    ControlJob,
    Engine,
    GenerationJob,
    default_name,
)
from adapterkit.serve.schemas import (
    AdapterLoadRequest,
    APIError,
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    new_id,
    now,
    usage,
)

logger = logging.getLogger(__name__)

#: OpenAI's default ``max_tokens`` of a completion
COMPLETION_MAX_TOKENS = 16
#: routes anyone may call, also when the server has an API key (load balancers' health checks)
OPEN_PATHS = frozenset({"/health"})


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (started with the app, stopped with it).

    Args:
        engine: the :class:`Engine` to serve.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    app = FastAPI(title="adapterkit", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_Gate, api_key=api_key, metrics=engine.metrics)
    _error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": engine.base_names[0], "adapters": len(engine.adapters)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type=prom.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        base = engine.base_names[0]
        data = [{"id": base, "object": "model", "created": int(engine.started), "owned_by": "adapterkit",
                 "root": base, "parent": None}]
        for adapter in sorted(engine.adapters.values(), key=lambda a: a.name):
            data.append({"id": adapter.name, "object": "model", "created": adapter.created, "owned_by": "adapterkit",
                         "root": adapter.source, "parent": base})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        adapter = _resolve(engine, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list; send a string or a list of strings.", param="prompt")
        _single_choice(body.n)
        stops = body.stop_strings()
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_MAX_TOKENS
        jobs = []
        for prompt in prompts:
            ids = await run_in_threadpool(engine.encode, prompt)
            jobs.append(_generation_job(engine, adapter, ids, max_tokens, body, stops))
        rid, created = new_id("cmpl"), now()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]}

        if body.stream:
            return _stream(engine, jobs, chunk, body.stream_options, echo=prompts if body.echo else None)
        done = await _run(engine, jobs)
        choices = [{"index": i, "text": (prompts[i] if body.echo else "") + c.text, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(done)]
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices,
                "usage": _usage(done)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Any:
        adapter = _resolve(engine, body.model)
        _single_choice(body.n)
        stops = body.stop_strings()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await run_in_threadpool(_guard(engine.chat_prompt), messages)
        # The chat template writes the special tokens (a BOS among them) itself.
        ids = await run_in_threadpool(engine.encode, prompt, special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        jobs = [_generation_job(engine, adapter, ids, max_tokens, body, stops)]
        rid, created = new_id("chatcmpl"), now()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            delta = {} if finish is not None and not text else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [choice]}

        if body.stream:
            return _stream(engine, jobs, chunk, body.stream_options, first={"role": "assistant", "content": ""})
        done = await _run(engine, jobs)
        choices = [{"index": 0, "message": {"role": "assistant", "content": done[0].text}, "logprobs": None,
                    "finish_reason": done[0].finish_reason}]
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model, "choices": choices,
                "usage": _usage(done)}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        adapter = _resolve(engine, body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input is an empty list; send a string or a list of strings.", param="input")
        try:
            engine.classify_kind(adapter)
        except AdapterKitError as err:
            raise APIError(400, str(err), param="model", code="not_a_classifier") from None
        results = await _await(engine.submit(ClassifyJob(adapter, list(texts))))
        data = [{"index": i, "object": "classification", **r} for i, r in enumerate(results)]
        return {"object": "list", "model": body.model, "data": data}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        data = [{"object": "adapter", **a.describe()} for a in sorted(engine.adapters.values(), key=lambda a: a.name)]
        return {"object": "list", "data": data, "pool": engine.pool.stats()}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoadRequest) -> dict[str, Any]:
        try:
            folder = await run_in_threadpool(engine.fetch, body.source, body.revision)
            name = body.name or default_name(body.source)
            job = ControlJob(lambda: engine.load(name, body.source, folder, pin=body.pin))
            adapter = await _await(engine.submit(job))
        except AdapterNotFoundError as err:
            raise APIError(404, str(err), param="source", code="adapter_not_found") from None
        except PoolFullError as err:
            raise APIError(503, str(err), type="server_error", code="pool_full") from None
        except HubError as err:
            raise APIError(502, str(err), type="server_error", param="source", code="hub_error") from None
        except AdapterKitError as err:
            raise APIError(400, f"The adapter could not be loaded: {err}", param="source",
                           code="adapter_load_failed") from None
        return {"object": "adapter", **adapter.describe()}

    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await _await(engine.submit(ControlJob(lambda: engine.unload(name))))
        return {"id": name, "object": "adapter", "deleted": True}

    return app


# --- requests to jobs -------------------------------------------------------------------------
def _resolve(engine: Engine, model: str) -> str | None:
    try:
        return engine.resolve(model)
    except AdapterNotFoundError as err:
        raise APIError(404, str(err), param="model", code="model_not_found") from None


def _single_choice(n: int) -> None:
    if n != 1:
        raise APIError(400, f"n={n} is not supported: this server returns one choice per prompt.", param="n")


def _generation_job(engine: Engine, adapter: str | None, ids: list[int], max_tokens: int | None, body: Any,
                    stops: tuple[str, ...]) -> GenerationJob:
    try:
        budget = engine.check_generation(ids, max_tokens)
    except ContextLengthError as err:
        raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from None
    except AdapterKitError as err:
        raise APIError(400, str(err), param="prompt") from None
    return GenerationJob(adapter, ids, budget, temperature=body.temperature, top_p=body.top_p, stop=stops,
                         seed=body.seed)


def _guard(fn: Callable) -> Callable:
    """``fn`` with adapterkit's errors turned into 400 responses."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AdapterKitError as err:
            raise APIError(400, str(err)) from None

    return call


async def _await(future: Any) -> Any:
    return await asyncio.wrap_future(future)


async def _run(engine: Engine, jobs: list[GenerationJob]) -> list[Completion]:
    """Submit ``jobs`` and wait for all of them; a cancelled request takes its rows out of the batch."""
    try:
        return list(await asyncio.gather(*(_await(engine.submit(job)) for job in jobs)))
    except asyncio.CancelledError:
        for job in jobs:
            job.cancelled = True
        raise


def _usage(done: list[Completion]) -> dict[str, int]:
    return usage(sum(c.prompt_tokens for c in done), sum(c.completion_tokens for c in done))


def _stream(engine: Engine, jobs: list[GenerationJob], chunk: Callable[[int, str, str | None], dict],
            options: dict[str, Any] | None, *, first: dict | None = None, echo: list[str] | None = None
            ) -> StreamingResponse:
    """Server-sent events: ``data: {chunk}`` as text arrives, a last chunk per choice, then ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def post(item: tuple[int, str | None]) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody reads this stream any more
            for job in jobs:
                job.cancelled = True

    for index, job in enumerate(jobs):
        job.on_text = lambda text, index=index: post((index, text))
        job.future.add_done_callback(lambda _, index=index: post((index, None)))
        engine.submit(job)

    def sse(data: Any) -> str:
        return f"data: {json.dumps(data)}\n\n"

    async def body() -> AsyncIterator[str]:
        remaining = len(jobs)
        try:
            for index in range(len(jobs)):
                if first is not None:
                    opening = chunk(index, "", None)
                    opening["choices"][0]["delta"] = dict(first)
                    yield sse(opening)
                if echo is not None:
                    yield sse(chunk(index, echo[index], None))
            while remaining:
                index, text = await events.get()
                if text is not None:
                    yield sse(chunk(index, text, None))
                    continue
                remaining -= 1
                future = jobs[index].future
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    yield sse(_error_response(future.exception()).body())
                    continue
                yield sse(chunk(index, "", future.result().finish_reason))
            if (options or {}).get("include_usage"):
                done = [j.future.result() for j in jobs if j.future.done() and not j.future.cancelled()
                        and j.future.exception() is None]
                last = chunk(0, "", None)
                last["choices"], last["usage"] = [], _usage(done)
                yield sse(last)
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:  # the client went away: free the rows
                job.cancelled = True

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- errors -----------------------------------------------------------------------------------
def _error_response(err: BaseException) -> APIError:
    """The API error an exception from the engine stands for."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, AdapterNotFoundError):
        return APIError(404, str(err), param="model", code="model_not_found")
    if isinstance(err, PoolFullError):
        return APIError(503, str(err), type="server_error", code="pool_full")
    if isinstance(err, AdapterKitError):
        return APIError(400, str(err))
    logger.error("Request failed", exc_info=err)
    return APIError(500, f"The server failed on this request ({type(err).__name__}: {err}).", type="server_error")


def _error_handlers(app: FastAPI) -> None:
    def respond(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return respond(err)

    @app.exception_handler(AdapterKitError)
    async def library_error(request: Request, err: AdapterKitError) -> JSONResponse:
        return respond(_error_response(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            detail = next(p for p in problems if p.get("type") == "json_invalid")
            message = f"The request body is not valid JSON ({detail.get('ctx', {}).get('error', detail.get('msg'))})."
            return respond(APIError(400, message, code="invalid_json"))
        parts, param = [], None
        for p in problems:
            loc = ".".join(str(x) for x in p.get("loc", ()) if x != "body")
            param = param or loc or None
            parts.append(f"{loc or 'body'}: {p.get('msg')}")
        return respond(APIError(400, "Invalid request: " + "; ".join(parts) + ".", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}"
        return respond(APIError(err.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def failure(request: Request, err: Exception) -> JSONResponse:
        return respond(_error_response(err))


class _Gate:
    """ASGI middleware: the API key check, and the request count and latency of every response."""

    def __init__(self, app: Any, *, api_key: str | None, metrics: prom.Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = {"status": 500, "recorded": False}

        def record() -> None:
            if not state["recorded"]:
                state["recorded"] = True
                route = getattr(scope.get("route"), "path", None) or "other"
                self.metrics.requests.inc(route, str(state["status"]))
                self.metrics.latency.observe(time.perf_counter() - started, route)

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                error = APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, watched)
                return
            await self.app(scope, receive, watched)
        finally:
            record()

    def _authorized(self, scope: dict) -> bool:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


# --- running it -------------------------------------------------------------------------------
class BackgroundServer:
    """The app served by uvicorn on a thread of this process; ``url`` is its address.

    Example:
        >>> with BackgroundServer(create_app(engine)) as server:
        ...     httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="adapterkit-server", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving; returns once the server accepts requests."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The server on {self.url} did not start within {timeout} s.")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving (the engine stops with the app) and wait for the thread."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
