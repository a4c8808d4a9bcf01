"""What `instructkit serve` accepts: strict request types, the server's limits and its error shape.

Kept apart from the app and the scheduler so that every check a request meets before it may wait
for the model can be read in one place. Types are strict (a boolean is not a number, a string is not
a float) because a lenient server silently turns `max_tokens: true` into 1.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("instructkit.serve")

SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed; anything above raised inside generation


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def internal_error(exc: BaseException, where: str) -> ApiError:
    """A 500 that tells the client nothing about our internals but an id; the log has the traceback
    under the same id, so an operator can find it from a user's report."""
    error_id = secrets.token_hex(6)
    log.error("internal error %s in %s", error_id, where, exc_info=(type(exc), exc, exc.__traceback__))
    return ApiError(500, f"internal error (id {error_id}); the server log has the details under this id",
                    "internal_error", kind="server_error")


@dataclass(frozen=True)
class ServeLimits:
    """Bounds that keep one client from taking the server from the others. Each is a `serve` flag
    (the field name with dashes), named in the error a request gets when it crosses it."""

    max_body_bytes: int = 1_048_576
    max_messages: int = 128  # prompt building grows with the square of the turns (400 turns: ~1 s)
    max_prompt_chars: int = 100_000
    max_stop_strings: int = 4  # OpenAI's own limit
    max_stop_chars: int = 128
    max_queue: int = 64
    max_batch: int = 8
    request_timeout: float = 300.0
    # A batch still running this long after its last request's deadline is stuck in a single step
    # (rows are stopped within one token of their deadline): /health then answers 503.
    stuck_grace: float = 10.0
    drain_timeout: float = 2.0  # on SIGTERM: how long running generations may finish before they are stopped
    batch_wait: float = 0.01  # how long a batch waits for companions that arrive at nearly the same time

    def __post_init__(self):
        for f in fields(self):
            at_least_one = f.name.startswith("max_") or f.name == "request_timeout"
            if getattr(self, f.name) < 0 or (at_least_one and getattr(self, f.name) <= 0):
                raise ValueError(f"--{flag(f.name)} must be positive, not {getattr(self, f.name)}")


def flag(field: str) -> str:
    return field.replace("_", "-")


def over_limit(what: str, limits: ServeLimits, field: str, param: str | None, code: str = "limit_exceeded",
               status: int = 400) -> ApiError:
    value = getattr(limits, field)
    return ApiError(status, f"{what}; this server's limit is {value} ({field}). Shorten the request, or start "
                            f"the server with a larger --{flag(field)}.", code, param)


class _Strict(BaseModel):
    # Unknown OpenAI parameters (logprobs, tools, user, ...) are accepted and ignored, as before.
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)

    def stops(self) -> list[str]:
        """The stop strings, empty ones dropped: an empty string would match before any text, so
        `stop: ""` (which some client wrappers send for "none") means no stop string."""
        given = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in given if s]


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt_chars(self) -> int:
        return sum(len(m.text()) for m in self.messages)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)

    def prompt_chars(self) -> int:
        return sum(map(len, [self.prompt] if isinstance(self.prompt, str) else self.prompt))


def parse_request(kind: type[SamplingRequest], body: bytes) -> SamplingRequest:
    """Validate a JSON body; the first problem becomes an OpenAI-shaped 400 naming the field."""
    try:
        return kind.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        if first["type"] == "json_invalid":
            raise ApiError(400, "We could not parse the JSON body of your request: "
                                f"{first.get('msg', 'invalid JSON')}. Send one JSON object.", "json_invalid") from None
        raise ApiError(400, f"Invalid request: {where or 'body'}: {first['msg']}", first["type"], where) from None


def check_limits(request: SamplingRequest, limits: ServeLimits) -> None:
    """The limits that can be checked before any work is done for the request."""
    if request.n != 1:
        raise ApiError(400, "n must be 1 on this server; send several requests instead", "unsupported_value", "n")
    if isinstance(request, ChatRequest) and len(request.messages) > limits.max_messages:
        raise over_limit(f"the request has {len(request.messages)} messages", limits, "max_messages", "messages")
    if isinstance(request, CompletionRequest) and not isinstance(request.prompt, str) and len(request.prompt) != 1:
        raise ApiError(400, "this server completes one prompt per request; send a string or a list of one",
                       "unsupported_value", "prompt")
    chars = request.prompt_chars()
    if chars > limits.max_prompt_chars:
        param = "messages" if isinstance(request, ChatRequest) else "prompt"
        raise over_limit(f"the prompt has {chars} characters", limits, "max_prompt_chars", param)
    given = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(given) > limits.max_stop_strings:
        raise over_limit(f"the request has {len(given)} stop strings", limits, "max_stop_strings", "stop")
    longest = max(map(len, given), default=0)
    if longest > limits.max_stop_chars:
        raise over_limit(f"a stop string has {longest} characters", limits, "max_stop_chars", "stop")
