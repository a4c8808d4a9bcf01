"""The model side of `instructkit serve`: a bounded queue on the event loop, batches of requests that can
share a forward pass, and one generation thread that can fail or be abandoned without wedging the server.

Requests wait as asyncio objects (never in a thread pool, whose threads the streams need to send).
Queued requests with the same sampling settings run as one left-padded batch through `model.generate`;
a stopping criterion sees every new token of every row, so each row streams, meets its stop strings,
its token limit, its deadline or its client's disconnect on its own, within one token.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from instructkit.serve_types import ApiError, ServeLimits, internal_error, over_limit


@dataclass(frozen=True)
class Sampling:
    """The settings a whole batch shares: requests differing in any of them are never batched together."""

    do_sample: bool
    temperature: float
    top_p: float
    eos: tuple[int, ...]
    seed: int | None = None

    def key(self, job_id: int) -> Hashable:
        # A seeded sampled request runs alone: its answer must depend on its seed, not on its neighbours.
        if self.do_sample and self.seed is not None:
            return ("alone", job_id)
        return (self.do_sample, self.temperature, self.top_p, self.eos)


@dataclass
class Text:
    text: str


@dataclass
class End:
    reason: str  # "stop" | "length" | "cancelled"
    tokens: int


@dataclass
class Failed:
    error: ApiError


Event = Text | End | Failed


class Job:
    """One request's generation. The worker thread pushes events; the request's coroutine reads them."""

    _ids = iter(range(1, 2**62))

    def __init__(self, ids: list[int], max_tokens: int, stops: list[str], sampling: Sampling, deadline: float):
        self.id = next(Job._ids)
        self.ids, self.max_tokens, self.stops, self.sampling, self.deadline = ids, max_tokens, stops, sampling, deadline
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.tokens = 0  # written by the worker only
        self.cancelled = False  # written by the event loop only; the worker reads it after each token
        self.cancel_error: ApiError | None = None
        self.tokens_at_cancel: int | None = None
        self.ended = False

    def push(self, event: Event) -> None:
        """Thread-safe; the last event (End or Failed) marks the job ended."""
        if self.ended:
            return
        self.ended = not isinstance(event, Text)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone and nobody is listening
            pass

    def cancel(self, error: ApiError | None = None) -> None:
        """Stop this job within one token; `error` is what its stream gets if it still listens."""
        if not self.cancelled:
            self.tokens_at_cancel, self.cancel_error, self.cancelled = self.tokens, error, True

    def timeout_error(self) -> ApiError:
        return ApiError(504, "the request ran past this server's time limit; ask for fewer tokens, or start the "
                             "server with a larger --request-timeout", "request_timeout", kind="timeout")


class Scheduler:
    """The bounded queue, the batch loop and the generation thread, all driven from the event loop."""

    def __init__(self, limits: ServeLimits, run_batch: Callable[[list[Job]], None]):
        self.limits, self.run_batch = limits, run_batch
        self.pending: deque[Job] = deque()
        self.reserved = 0  # admitted requests still building their prompt
        self.running: list[Job] = []
        self.batch_deadline = math.inf
        self.draining = False
        self.batch_sizes: Counter[int] = Counter()
        self._batch_seconds = 1.0  # running average, for Retry-After
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def admit(self) -> None:
        """Reserve a queue place before any work is done for a request (429 when the queue is full)."""
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another instance or after it restarts",
                           "server_shutting_down", kind="server_error", headers={"Retry-After": "5"})
        if self.waiting() >= self.limits.max_queue:
            retry = self.retry_after()
            error = over_limit(f"{self.waiting()} requests are already waiting for the model",
                               self.limits, "max_queue", None, "queue_full", 429)
            error.message += f" Retry after about {retry} s."
            error.headers, error.kind = {"Retry-After": str(retry)}, "rate_limit_error"
            raise error
        self.reserved += 1

    def waiting(self) -> int:
        """Requests waiting for the model; cancelled ones (their clients left) no longer hold a place."""
        return self.reserved + sum(not job.cancelled for job in self.pending)

    def release(self) -> None:
        """Give back a reservation whose request failed before it was queued."""
        self.reserved -= 1

    def submit(self, job: Job) -> None:
        self.reserved -= 1
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_shutting_down", kind="server_error")
        self.pending.append(job)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="instructkit-batches")
        self._wake.set()

    def retry_after(self) -> int:
        waves = len(self.pending) / self.limits.max_batch + (1 if self.running else 0)
        return max(1, min(60, math.ceil(waves * self._batch_seconds)))

    def stuck_for(self) -> float:
        """Seconds a running batch is past its last deadline plus the grace; 0 when nothing is stuck."""
        late = time.monotonic() - self.batch_deadline - self.limits.stuck_grace
        return late if self.running and late > 0 else 0.0

    def drain(self) -> None:
        """On SIGTERM: refuse new work, answer queued requests 503 now, and stop running ones after the
        drain timeout (they may finish first)."""
        if self.draining:
            return
        self.draining = True
        self._fail_pending()
        asyncio.get_running_loop().call_later(self.limits.drain_timeout, self.stop_now)

    def stop_now(self) -> None:
        """Stop everything within one token: queued requests and running ones get a 503."""
        self.draining = True
        self._fail_pending()
        error = ApiError(503, "the server shut down during this request; retry on another instance or after it "
                              "restarts", "server_shutting_down", kind="server_error")
        for job in self.running:
            job.cancel(error)

    def _fail_pending(self) -> None:
        error = ApiError(503, "the server is shutting down before this request started; retry on another "
                              "instance or after it restarts", "server_shutting_down", kind="server_error")
        while self.pending:
            self.pending.popleft().push(Failed(error))

    async def _run(self) -> None:
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            await self._gather()
            try:
                batch = self._take()
                if batch:
                    await self._execute(batch)
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop every later request
                internal_error(exc, "the batch scheduler")

    async def _gather(self) -> None:
        """Before a batch starts, let requests sent at the same moment join it: wait batch_wait, and
        while admitted requests are still having their prompts built (one at a time), up to 10 times
        that. A batch cannot take new rows once it runs, so a few ms here save a whole batch later."""
        waited, step = 0.0, self.limits.batch_wait
        while step and len(self.pending) < self.limits.max_batch and (waited < step or (
                self.reserved and waited < 10 * step)):
            await asyncio.sleep(step / 5)
            waited += step / 5

    def _take(self) -> list[Job]:
        """The oldest live job and up to max_batch - 1 later ones that share its settings."""
        live = deque()
        for job in self.pending:
            if job.cancelled:
                job.push(Failed(job.cancel_error) if job.cancel_error else End("cancelled", 0))
            elif time.monotonic() > job.deadline:
                job.push(Failed(job.timeout_error()))
            else:
                live.append(job)
        self.pending = live
        if not live:
            return []
        key = live[0].sampling.key(live[0].id)
        batch = [job for job in live if job.sampling.key(job.id) == key][:self.limits.max_batch]
        chosen = set(map(id, batch))
        self.pending = deque(job for job in live if id(job) not in chosen)
        return batch

    async def _execute(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.running, self.batch_deadline = batch, max(job.deadline for job in batch)
        self.batch_sizes[len(batch)] += 1
        started = time.monotonic()
        # A daemon thread of our own, not an executor: a step that never returns must not keep the
        # process from exiting on SIGTERM (executors join their threads at exit).
        threading.Thread(target=self._work, args=(batch, loop, done), daemon=True,
                         name="instructkit-generate").start()
        try:
            await done
        finally:
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)
            self.running, self.batch_deadline = [], math.inf

    def _work(self, batch: list[Job], loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        try:
            self.run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - run_batch answers its own failures; this catches its bugs
            error = internal_error(exc, "the batch loop")
            for job in batch:
                job.push(Failed(error))
        finally:
            for job in batch:  # a job left unanswered would wait for its deadline: answer it now
                if not job.ended:
                    job.push(Failed(internal_error(RuntimeError("generation ended without an answer"),
                                                   "the batch loop")))
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:
                pass


class _Row:
    """One job inside a running batch, on the worker thread: turns its new tokens into text (incremental
    detokenizing, so a long answer costs linear time), holds back what may still become a stop string,
    and ends the job on EOS, a stop string, its token limit, its deadline or a cancel."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.tokenizer = job, tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] was decoded last time; ids[read:] is new
        self.held = ""
        self.hold = max(map(len, job.stops), default=1) - 1  # a stop string may still end in the next piece

    def step(self, token: int) -> bool:
        """Take the row's new token; True once the row is done."""
        job = self.job
        if job.ended:
            return True
        job.tokens += 1
        if job.cancelled:
            job.push(Failed(job.cancel_error) if job.cancel_error else End("cancelled", job.tokens))
        elif time.monotonic() > job.deadline:
            job.push(Failed(job.timeout_error()))
        elif token in job.sampling.eos:
            self.finish("stop")
        else:
            self.ids.append(token)
            self._emit(self._decode(final=False))
            if not job.ended and job.tokens >= job.max_tokens:
                self.finish("length")
        return job.ended

    def finish(self, reason: str) -> None:
        self._emit(self._decode(final=True))
        if not self.job.ended:  # _emit may have ended it on a stop string
            if self.held:
                self.job.push(Text(self.held))
            self.job.push(End(reason, self.job.tokens))

    def _decode(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):  # an incomplete character
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def _emit(self, piece: str) -> None:
        if not piece:
            return
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.job.stops) if i >= 0), default=-1)
        if cut >= 0:  # never send the stop string itself, as OpenAI does not
            if cut:
                self.job.push(Text(text[:cut]))
            self.job.push(End("stop", self.job.tokens))
            return
        ready = len(text) - self.hold
        if ready > 0:
            self.job.push(Text(text[:ready]))
        self.held = text[max(ready, 0):]


class BatchGenerator:
    """Runs one batch through `model.generate` on the calling (worker) thread."""

    def __init__(self, loaded):
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        tok = loaded.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.device = next(loaded.model.parameters()).device

    def __call__(self, jobs: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        rows = [_Row(job, self.tokenizer) for job in jobs]

        class EachRow(StoppingCriteria):
            # HF calls this once per step with every row's new token last: the one place that sees all of them.
            def __call__(self, input_ids, scores, **kwargs):
                done = [row.step(t) for row, t in zip(rows, input_ids[:, -1].tolist())]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        try:
            with torch.no_grad():
                self.model.generate(**self._inputs(jobs), stopping_criteria=StoppingCriteriaList([EachRow()]))
        except Exception as exc:  # noqa: BLE001 - the failure ends these requests, never the server
            error = internal_error(exc, f"generation of a batch of {len(jobs)}")
            for job in jobs:
                job.push(Failed(error))
            return
        for row in rows:  # rows that generate itself stopped (its own length limit)
            if not row.job.ended:
                row.finish("length" if row.job.tokens >= row.job.max_tokens else "stop")

    def _inputs(self, jobs: list[Job]) -> dict:
        import torch
        from transformers import GenerationConfig

        width = max(len(job.ids) for job in jobs)  # left padding: every row's next token is at the end
        ids = [[self.pad] * (width - len(job.ids)) + job.ids for job in jobs]
        mask = [[0] * (width - len(job.ids)) + [1] * len(job.ids) for job in jobs]
        s = jobs[0].sampling
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p} if s.do_sample \
            else {"do_sample": False}
        config = GenerationConfig(max_new_tokens=max(job.max_tokens for job in jobs), eos_token_id=list(s.eos),
                                  pad_token_id=self.pad, **sampling)
        if s.do_sample and s.seed is not None:
            torch.manual_seed(s.seed)  # seeded requests run alone (Sampling.key), so the seed is theirs
        return {"input_ids": torch.tensor(ids, device=self.device),
                "attention_mask": torch.tensor(mask, device=self.device), "generation_config": config}
