"""`instructkit serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) for a run or model.

Chat requests are rendered with the template the run trained with, through the same code that built
the training prompts. One model, one generation at a time: concurrent requests wait in turn on a
lock (the event loop stays free; generation runs in worker threads). Every error, malformed JSON
included, is answered in OpenAI's error shape with a 4xx status, and the server keeps running.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from instructkit.data.formats import Message
from instructkit.data.templates import stop_token_ids
from instructkit.generate import Loaded, prompt_example


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI parameters we do not use are accepted and ignored
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    seed: Union[int, None] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Union[int, None] = Field(None, ge=1)
    max_completion_tokens: Union[int, None] = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)


class Engine:
    """The loaded model behind a lock: prompt ids in, text out (whole or streamed)."""

    def __init__(self, loaded: Loaded, model_id: str, default_max_tokens: int = 256):
        self.loaded, self.model_id, self.default_max_tokens = loaded, model_id, default_max_tokens
        self.lock = threading.Lock()
        config = loaded.model.config
        self.context = getattr(config, "max_position_embeddings", None) or 4096
        self.device = next(loaded.model.parameters()).device

    def chat_ids(self, request: ChatRequest) -> list[int]:
        messages = tuple(Message("system" if m.role == "developer" else m.role, m.text()) for m in request.messages)
        if messages[-1].role == "assistant":
            raise ApiError(400, "the last message must come from the user (or system), not the assistant",
                           "invalid_messages", "messages")
        return prompt_example(self.loaded, messages).input_ids

    def completion_ids(self, request: CompletionRequest) -> list[int]:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise ApiError(400, "this server completes one prompt per request", "unsupported_value", "prompt")
        return self.loaded.tokenizer(prompts[0])["input_ids"]

    def check(self, request: _Request, ids: list[int], max_tokens: int) -> None:
        if request.model != self.model_id:
            raise ApiError(404, f"The model '{request.model}' does not exist; this server serves '{self.model_id}'",
                           "model_not_found", "model")
        if request.n != 1:
            raise ApiError(400, "n must be 1 on this server", "unsupported_value", "n")
        if len(ids) + max_tokens > self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{len(ids)} and max_tokens asks for {max_tokens} more. Shorten the messages or lower "
                           "max_tokens.", "context_length_exceeded", "messages")

    def _kwargs(self, request: _Request, ids: list[int], max_tokens: int, chat: bool) -> dict:
        import torch
        from transformers import GenerationConfig

        tok = self.loaded.tokenizer
        sampling = (dict(do_sample=True, temperature=request.temperature, top_p=request.top_p)
                    if request.temperature > 0 else dict(do_sample=False))
        eos = stop_token_ids(tok, self.loaded.template) if chat else tok.eos_token_id
        stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        config = GenerationConfig(max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                  stop_strings=stops or None, **sampling)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        return dict(input_ids=torch.tensor([ids], device=self.device), generation_config=config, tokenizer=tok)

    def generate(self, request: _Request, ids: list[int], max_tokens: int, chat: bool) -> tuple[str, int, str]:
        """(text, completion tokens, finish_reason)."""
        import torch

        with self.lock, torch.no_grad():
            out = self.loaded.model.generate(**self._kwargs(request, ids, max_tokens, chat))[0, len(ids):]
        text, reason = self._finish(request, self.loaded.tokenizer.decode(out, skip_special_tokens=True),
                                    len(out) >= max_tokens)
        return text, len(out), reason

    @staticmethod
    def _finish(request: _Request, text: str, at_limit: bool) -> tuple[str, str]:
        stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
        cut = min((text.find(s) for s in stops if s and s in text), default=-1)
        if cut >= 0:
            return text[:cut], "stop"
        return text, "length" if at_limit else "stop"

    def stream(self, request: _Request, ids: list[int], max_tokens: int, chat: bool) -> Iterator[str | None]:
        """Text pieces as they are generated; None last if the token limit was reached."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        cancelled = threading.Event()

        class Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        count = [0]

        def run():
            with torch.no_grad():
                out = self.loaded.model.generate(**self._kwargs(request, ids, max_tokens, chat), streamer=streamer,
                                                 stopping_criteria=StoppingCriteriaList([Cancel()]))
            count[0] = out.shape[1] - len(ids)

        with self.lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                yield from streamer
            finally:  # the client went away, or we are done: stop generating and wait for the thread
                cancelled.set()
                worker.join()
        if count[0] >= max_tokens:
            yield None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /health."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="instructkit", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "We could not parse the JSON body of your request." if first.get("type") == "json_invalid" \
            else f"Invalid request: {where or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(ApiError(400, message, first.get("type"), where).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), None).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None,
                                     kind="server_error").body(), status_code=500)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(ApiError(401, "Incorrect API key provided.", "invalid_api_key").body(),
                                    status_code=401)
        return await call_next(request)

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": int(time.time()), "owned_by": "instructkit"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise ApiError(404, f"The model '{model_id}' does not exist", "model_not_found", "model")
        return model_card()

    def respond(request: _Request, ids: list[int], max_tokens: int, chat: bool):
        engine.check(request, ids, max_tokens)
        created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, reason: str | None, delta: bool) -> dict:
            if chat:
                body = {"delta": {} if text is None else {"content": text}} if delta else \
                    {"message": {"role": "assistant", "content": text}}
            else:
                body = {"text": text or "", "logprobs": None}
            return {"index": 0, **body, "finish_reason": reason}

        if not request.stream:
            async def whole():
                text, n, reason = await run_in_threadpool(engine.generate, request, ids, max_tokens, chat)
                return {"id": ident, "object": kind, "created": created, "model": engine.model_id,
                        "choices": [choice(text, reason, False)],
                        "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}
            return whole()

        def events() -> Iterator[str]:
            chunk = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                     "model": engine.model_id}
            if chat:
                yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]})
            stops = [request.stop] if isinstance(request.stop, str) else [s for s in request.stop or [] if s]
            hold = max((len(s) for s in stops), default=1) - 1  # text that may still become a stop string
            reason, sent, pending = "stop", "", ""
            pieces = engine.stream(request, ids, max_tokens, chat)
            for piece in pieces:
                if piece is None:
                    reason = "length"
                    continue
                pending += piece
                cut = min((i for i in ((sent + pending).find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:  # never send the stop string itself, as OpenAI does not
                    pending, reason = (sent + pending)[len(sent):cut], "stop"
                    pieces.close()
                    break
                ready = pending[:max(len(pending) - hold, 0)]
                if ready:
                    sent, pending = sent + ready, pending[len(ready):]
                    yield _sse({**chunk, "choices": [choice(ready, None, True)]})
            if pending:
                yield _sse({**chunk, "choices": [choice(pending, None, True)]})
            yield _sse({**chunk, "choices": [choice(None if chat else "", reason, True)]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        ids = engine.chat_ids(request)
        max_tokens = request.max_completion_tokens or request.max_tokens or engine.default_max_tokens
        out = respond(request, ids, max_tokens, chat=True)
        return await out if not isinstance(out, StreamingResponse) else out

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        out = respond(request, engine.completion_ids(request), request.max_tokens, chat=False)
        return await out if not isinstance(out, StreamingResponse) else out

    return app


def served_name(run_or_model: str) -> str:
    """The model id clients ask for: a run's (or model directory's) name, else the hub id as given."""
    from pathlib import Path

    path = Path(run_or_model)
    return path.resolve().name if path.exists() else run_or_model


def serve(loaded: Loaded, model_id: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(Engine(loaded, model_id), api_key), host=host, port=port, log_level="info")
