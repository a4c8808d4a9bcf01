"""`instructkit serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) for a run or model.

Chat requests are rendered with the template the run trained with, through the same code that built
the training prompts. A request is checked (model name, strict types, limits) before any work is done
for it, its prompt is built off the event loop, then it waits for the model in a bounded queue
(serve_batch.py) where requests with the same sampling settings share forward passes. Every error is
answered in OpenAI's shape; a failure inside generation ends only the requests it touched.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter annotations at run
# time, and `Request` is imported inside create_app, so they must be real classes, not strings.
import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from instructkit.data.formats import Message
from instructkit.data.templates import stop_token_ids
from instructkit.generate import Loaded, prompt_example
from instructkit.serve_batch import BatchGenerator, End, Event, Failed, Job, Sampling, Scheduler, Text
from instructkit.serve_types import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    ServeLimits,
    check_limits,
    internal_error,
    over_limit,
    parse_request,
)

if TYPE_CHECKING:
    from fastapi import FastAPI


class Engine:
    """The loaded model behind a batching queue: checked requests in, jobs whose events are text out."""

    def __init__(self, loaded: Loaded, model_id: str, default_max_tokens: int = 256,
                 limits: ServeLimits | None = None):
        self.loaded, self.model_id, self.default_max_tokens = loaded, model_id, default_max_tokens
        self.limits = limits or ServeLimits()
        self.context = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
        self.scheduler = Scheduler(self.limits, BatchGenerator(loaded))
        # One thread builds prompts, in turn: off the event loop, and never holding a shared pool thread
        # (tokenizers are not safe to reconfigure from several threads at once).
        self.prompt_pool = ThreadPoolExecutor(1, thread_name_prefix="instructkit-prompt")

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.model_id}'",
                           "model_not_found", "model")

    def chat_ids(self, request: ChatRequest) -> list[int]:
        messages = tuple(Message("system" if m.role == "developer" else m.role, m.text()) for m in request.messages)
        if messages[-1].role == "assistant":
            raise ApiError(400, "the last message must come from the user (or system), not the assistant",
                           "invalid_messages", "messages")
        return prompt_example(self.loaded, messages).input_ids

    def completion_ids(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        return self.loaded.tokenizer(prompt)["input_ids"]

    def max_tokens(self, request: SamplingRequest) -> int:
        if isinstance(request, ChatRequest):
            return request.max_completion_tokens or request.max_tokens or self.default_max_tokens
        return request.max_tokens

    def sampling(self, request: SamplingRequest) -> Sampling:
        tok = self.loaded.tokenizer
        eos = stop_token_ids(tok, self.loaded.template) if isinstance(request, ChatRequest) else [tok.eos_token_id]
        greedy = request.temperature == 0
        return Sampling(not greedy, 0.0 if greedy else request.temperature, 1.0 if greedy else request.top_p,
                        tuple(sorted(i for i in eos if i is not None)), request.seed)

    async def start(self, request: SamplingRequest) -> Job:
        """Check, queue-admit, build the prompt off the loop, check its length, and queue the job."""
        self.check_model(request.model)  # before any work: a wrong name costs nothing
        check_limits(request, self.limits)
        self.scheduler.admit()
        try:
            build = self.chat_ids if isinstance(request, ChatRequest) else self.completion_ids
            ids = await asyncio.get_running_loop().run_in_executor(self.prompt_pool, build, request)
            max_tokens = self.max_tokens(request)
            if len(ids) + max_tokens > self.context:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the prompt "
                                    f"has {len(ids)} and max_tokens asks for {max_tokens} more. Shorten the messages "
                                    "or lower max_tokens.", "context_length_exceeded", "messages")
            job = Job(ids, max_tokens, request.stops(), self.sampling(request),
                      time.monotonic() + self.limits.request_timeout)
        except BaseException:
            self.scheduler.release()
            raise
        self.scheduler.submit(job)
        return job

    def health(self) -> tuple[int, dict]:
        s = self.scheduler
        body = {"status": "ok", "model": self.model_id, "queued": s.waiting(),
                "running": len(s.running), "batches": {str(k): v for k, v in sorted(s.batch_sizes.items())}}
        if s.stuck_for():
            return 503, {**body, "status": "stuck", "detail": f"a generation is {s.stuck_for():.0f} s past its time "
                                                              "limit and does not stop; restart the server"}
        if s.draining:
            return 503, {**body, "status": "draining"}
        return 200, body


async def next_event(job: Job) -> Event:
    """The job's next event, or a timeout error once its deadline has passed (a stuck worker included)."""
    grace = 1.0  # the worker reports its own timeout within a token; this is for when it cannot
    try:
        return await asyncio.wait_for(job.events.get(), max(job.deadline - time.monotonic(), 0) + grace)
    except asyncio.TimeoutError:
        job.cancel(job.timeout_error())
        return Failed(job.timeout_error())


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def watch_disconnect(receive, job: Job) -> asyncio.Task:
    """Cancel the job (within one token) as soon as its client goes away, streamed or not: without
    this, a stream learns of it only when a send fails, and a waiting request never."""
    def gone(task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # retrieved, so a receive() that failed is not reported as unhandled
            job.cancel()

    task = asyncio.ensure_future(_until_disconnect(receive))
    task.add_done_callback(gone)
    return task


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Reply:
    """The OpenAI response shapes of one request (chat or text completion, whole or chunked)."""

    def __init__(self, model_id: str, chat: bool):
        self.chat, self.model_id = chat, model_id
        self.id, self.created = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"

    def choice(self, text: str | None, reason: str | None, delta: bool) -> dict:
        if self.chat:
            body = {"delta": {} if text is None else {"content": text}} if delta else \
                {"message": {"role": "assistant", "content": text}}
        else:
            body = {"text": text or "", "logprobs": None}
        return {"index": 0, **body, "finish_reason": reason}

    def chunk(self, choice: dict) -> str:
        kind = f"{self.kind}.chunk" if self.chat else self.kind
        return _sse({"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                     "choices": [choice]})

    def whole(self, text: str, end: End, prompt_tokens: int) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model_id,
                "choices": [self.choice(text, end.reason, False)], "usage": self.usage(end, prompt_tokens)}

    def usage_chunk(self, end: End, prompt_tokens: int) -> str:
        """The last chunk when the client asked for stream_options.include_usage, as OpenAI sends it."""
        kind = f"{self.kind}.chunk" if self.chat else self.kind
        return _sse({"id": self.id, "object": kind, "created": self.created, "model": self.model_id, "choices": [],
                     "usage": self.usage(end, prompt_tokens)})

    @staticmethod
    def usage(end: End, prompt_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": end.tokens,
                "total_tokens": prompt_tokens + end.tokens}


async def answer_whole(job: Job, reply: Reply, receive) -> dict:
    watcher = watch_disconnect(receive, job)
    try:
        parts = []
        while isinstance(event := await next_event(job), Text):
            parts.append(event.text)
    finally:
        watcher.cancel()
    if isinstance(event, Failed):
        raise event.error
    return reply.whole("".join(parts), event, len(job.ids))


async def answer_stream(job: Job, reply: Reply, receive, usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events; a failure becomes an error event, then the stream ends. However the stream
    ends (done, failed, client gone, task cancelled), the job is cancelled, so its rows stop."""
    watcher = watch_disconnect(receive, job)
    try:
        if reply.chat:
            yield reply.chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        while isinstance(event := await next_event(job), Text):
            yield reply.chunk(reply.choice(event.text, None, True))
        if isinstance(event, Failed):
            yield _sse(event.error.body())
        elif event.reason != "cancelled":
            yield reply.chunk(reply.choice(None if reply.chat else "", event.reason, True))
            if usage:
                yield reply.usage_chunk(event, len(job.ids))
            yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        job.cancel()


class Guard:
    """Plain ASGI middleware in front of FastAPI: the bearer key on every route but /health (the API
    schema included), and the body size limit, checked while the body is read rather than after
    (FastAPI's own max_body_size is newer than the FastAPI versions we support)."""

    def __init__(self, app, api_key: str | None, limits: ServeLimits):
        self.app, self.api_key, self.limits = app, api_key, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
            return await self._refuse(scope, receive, send, ApiError(
                401, "Incorrect API key provided. Send the header 'Authorization: Bearer KEY' with the server's key.",
                "invalid_api_key", kind="authentication_error", headers={"WWW-Authenticate": "Bearer"}))
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limits.max_body_bytes:
                return await self._refuse(scope, receive, send, over_limit(
                    "the request body is larger than allowed", self.limits, "max_body_bytes", None,
                    "body_too_large", 413))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body, the client's own events: its disconnect above all
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return secrets.compare_digest(given, f"Bearer {self.api_key}".encode())

    @staticmethod
    async def _refuse(scope, receive, send, error: ApiError) -> None:
        from starlette.responses import JSONResponse

        await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None) -> "FastAPI":
    """The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /health (the one open route)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import StreamingResponse

    class Stream(StreamingResponse):
        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            except (ClientDisconnect, OSError):  # the client left mid-stream: its job is cancelled already
                pass

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.scheduler.stop_now()  # the server is going: stop the generation thread within one token

    app = FastAPI(title="instructkit", docs_url="/docs", redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return JSONResponse(internal_error(exc, request.url.path).body(), status_code=500)

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": int(time.time()), "owned_by": "instructkit"}

    @app.get("/health")
    async def health():
        status, body = engine.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        engine.check_model(model_id)
        return model_card()

    async def respond(http: Request, kind: type[SamplingRequest]):
        try:
            request = parse_request(kind, await http.body())
            job = await engine.start(request)
            reply = Reply(engine.model_id, chat=kind is ChatRequest)
            if request.stream:
                usage = bool(request.stream_options and request.stream_options.include_usage)
                return Stream(answer_stream(job, reply, http.receive, usage), media_type="text/event-stream")
            return await answer_whole(job, reply, http.receive)
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - answered here, so the log has it once, under its id
            raise internal_error(exc, http.url.path) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await respond(http, ChatRequest)

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await respond(http, CompletionRequest)

    app.add_middleware(Guard, api_key=api_key, limits=engine.limits)
    return app


def served_name(run_or_model: str) -> str:
    """The model id clients ask for: a run's (or model directory's) name, else the hub id as given."""
    from pathlib import Path

    path = Path(run_or_model)
    return path.resolve().name if path.exists() else run_or_model


def serve(loaded: Loaded, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServeLimits | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain: queued requests get 503 at once, running ones may
    finish for limits.drain_timeout seconds, then every connection is closed and the call returns."""
    import logging
    import signal

    import uvicorn

    engine = Engine(loaded, model_id, limits=limits)
    logger = logging.getLogger("instructkit.serve")
    if not logger.handlers:  # 500s are logged with their id and traceback next to uvicorn's own lines
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Not re-raised after shutdown (uvicorn's default), so a drained server exits with code 0.
            self.force_exit = self.should_exit and sig == signal.SIGINT  # a second Ctrl-C: stop waiting for connections
            self.should_exit = True
            try:
                asyncio.get_running_loop().call_soon_threadsafe(engine.scheduler.drain)
            except RuntimeError:  # not started yet: nothing to drain
                pass

    config = uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=max(1, round(engine.limits.drain_timeout + 1)))
    Server(config).run()
