"""`instructkit serve` under load and faults, on 127.0.0.1.

In its own process: 16 clients send 240 requests mixing whole and streamed answers, clients that hang up
mid-stream, slow readers, malformed and oversized bodies. Afterwards nothing hung, every well-formed request
got exactly its one-at-a-time answer, health is 200 and the server's memory is back near where it started.
Then SIGTERM under load: it exits within 5 s. In process, with small limits: each limit names its flag, a
full queue answers 429, and a stuck step turns /health 503 while its request gets 504."""

import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.integration.test_serve import call, chat, free_port, open_stream, read_events, start_server, wait_until

KEY = "load-test-key"
CLIENTS, REQUESTS, MAX_TOKENS = 16, 240, 16
CHATS = ["Say yes.", "Say no.", "Add one. 2", "Name a fruit.", "Repeat the word. cat", "Name a color."]
PROMPTS = ["Once upon", "The weather"]
RSS_MARGIN = 40 * 2**20  # allocator caches move RSS by a few MB; a leak of 240 requests' state would not fit


def request(port: int, body: bytes, path: str = "/v1/chat/completions", timeout: float = 30):
    """(connection, response) of one POST; the caller reads and closes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    return conn, conn.getresponse()


def whole(port: int, body: bytes, path: str) -> tuple[int, dict]:
    conn, response = request(port, body, path)
    try:
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def stream(port: int, body: bytes, path: str, stop_after: int | None = None, pause: float = 0.0) -> tuple[int, str]:
    """Read a stream's events (all, or hang up after `stop_after`); returns (status, text or 'error')."""
    conn, response = request(port, body, path)
    try:
        if response.status != 200:
            return response.status, json.loads(response.read())["error"]["code"]
        text, events = "", 0
        while line := response.fp.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                return 200, text
            chunk = json.loads(data)
            if "error" in chunk:
                return 200, "error: " + chunk["error"]["code"]
            choice = chunk["choices"][0]
            text += choice.get("text") or choice.get("delta", {}).get("content") or ""
            events += 1
            if stop_after is not None and events >= stop_after:
                return 200, "left"
            time.sleep(pause)
        return 200, "ended without [DONE]"
    finally:
        conn.close()


def body_for(prompt: str, **fields) -> tuple[bytes, str]:
    if prompt in PROMPTS:
        return json.dumps({"model": "tiny", "prompt": prompt, **fields}).encode(), "/v1/completions"
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": prompt}], **fields}).encode(), \
        "/v1/chat/completions"


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """The CLI serving the random tiny model (varied answers), the key given by environment variable."""
    port, log = free_port(), tmp_path_factory.mktemp("serve-load") / "server.log"
    # One intra-op thread: the tiny model gains nothing from two, and on a 2-core machine shared with other
    # work, two OpenMP threads waiting on each other made the same load take 15-30x longer.
    env = {**os.environ, "INSTRUCTKIT_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", str(tiny_model_dir), "--port", str(port),
                             "--model-name", "tiny", "--precision", "fp32", "--max-body-bytes", "65536",
                             "--drain-timeout", "0.5"],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.time() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "the server did not start within 60 s"
            time.sleep(0.2)
    yield {"port": port, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def health(port: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/health")
    response = conn.getresponse()
    answer = response.status, json.loads(response.read())
    conn.close()
    return answer


def one(port: int, kind: str, prompt: str, expected: dict[str, str]) -> tuple[str, float, int, str]:
    """Send one request of `kind`; returns (kind, seconds, status, outcome), outcome 'ok' when it went as
    it must (for malformed and oversized requests: the right 4xx)."""
    started = time.time()
    greedy = {"max_tokens": MAX_TOKENS, "temperature": 0}
    if kind in ("whole", "sampled"):
        body, path = body_for(prompt, **(greedy if kind == "whole" else {"max_tokens": MAX_TOKENS, "temperature": 0.8}))
        status, answer = whole(port, body, path)
        choice = answer.get("choices", [{}])[0]
        got = choice.get("text", choice.get("message", {}).get("content"))
        ok = status == 200 and (kind == "sampled" or got == expected[prompt])
    elif kind in ("stream", "slow", "leave"):
        body, path = body_for(prompt, stream=True, **greedy)
        status, got = stream(port, body, path, stop_after=1 if kind == "leave" else None,
                             pause=0.05 if kind == "slow" else 0.0)
        ok = status == 200 and got == ("left" if kind == "leave" else expected[prompt])
    elif kind == "malformed":
        body = random.Random(prompt).choice([b"{not json", b'{"model": "tiny", "messages": [], "max_tokens": true}',
                                             body_for(prompt, temperature="0.5")[0], b"[1, 2]"])
        status, got = whole(port, body, "/v1/chat/completions")
        ok = status == 400 and set(got["error"]) == {"message", "type", "param", "code"}
    else:  # oversized: a body past --max-body-bytes, or more messages than --max-messages
        huge = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
        many = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 200}).encode()
        status, got = whole(port, huge if prompt in PROMPTS else many, "/v1/chat/completions")
        ok = status in (400, 413) and "--max-" in got["error"]["message"]
    return kind, time.time() - started, status, "ok" if ok else f"unexpected: {status} {str(got)[:80]}"


def test_two_hundred_and_forty_mixed_requests_from_16_clients_leave_the_server_as_it_was(served):
    port, proc = served["port"], served["proc"]
    expected = {}
    for prompt in CHATS + PROMPTS:  # one at a time: the reference answers
        body, path = body_for(prompt, max_tokens=MAX_TOKENS, temperature=0)
        status, answer = whole(port, body, path)
        assert status == 200, answer
        choice = answer["choices"][0]
        expected[prompt] = choice.get("text", choice.get("message", {}).get("content"))
    with ThreadPoolExecutor(8) as pool:  # warm up batches before measuring memory
        list(pool.map(lambda p: whole(port, *body_for(p, max_tokens=MAX_TOKENS, temperature=0)), CHATS + PROMPTS))
    rss_before = psutil.Process(proc.pid).memory_info().rss

    rng = random.Random(13)
    kinds = rng.choices(["whole", "stream", "leave", "slow", "malformed", "oversized", "sampled"],
                        weights=[35, 20, 10, 10, 10, 8, 7], k=REQUESTS)
    work = [(kind, rng.choice(CHATS + PROMPTS)) for kind in kinds]
    started = time.time()
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one, port, kind, prompt, expected) for kind, prompt in work]
        results = [f.result(timeout=120) for f in futures]  # a hung request fails here
    elapsed = time.time() - started

    latencies = sorted(r[1] for r in results)
    statuses = Counter(f"{kind} {status}" for kind, _, status, _ in results)
    wrong = [r for r in results if r[3] != "ok"]
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    wait = time.time() + 10
    while health(port)[1]["queued"] or health(port)[1]["running"]:
        assert time.time() < wait, "requests still in the server 10 s after every client was done"
        time.sleep(0.05)
    rss_after = psutil.Process(proc.pid).memory_info().rss
    print(f"\n{len(results)} requests from {CLIENTS} clients in {elapsed:.1f} s; latency p50 {p50:.3f} s, "
          f"p99 {p99:.3f} s; kind and status: {dict(sorted(statuses.items()))}; not as expected: {len(wrong)}; "
          f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert not wrong, wrong
    assert "Traceback" not in served["log"].read_text(), served["log"].read_text()[-3000:]
    assert health(port)[0] == 200
    assert rss_after - rss_before < RSS_MARGIN, (rss_before, rss_after)


def test_sigterm_under_load_answers_everyone_and_exits_within_5_s(served):
    """Running streams get --drain-timeout (0.5 s here), then an error event; queued ones a 503 event at
    once; a client that never reads does not hold the process."""
    port, proc = served["port"], served["proc"]
    outcomes = []

    def client(body_path):
        try:
            outcomes.append(stream(port, *body_path))
        except (OSError, http.client.HTTPException) as exc:  # a connection closed by the exiting server
            outcomes.append((0, type(exc).__name__))

    def stalled():
        conn, _response = request(port, *body_for("Once upon", stream=True, max_tokens=900, temperature=0))
        time.sleep(8)  # reads nothing
        conn.close()

    long = body_for("Once upon", stream=True, max_tokens=900, temperature=0)
    queued = body_for("Say yes.", stream=True, max_tokens=MAX_TOKENS, temperature=0.7)
    threads = [threading.Thread(target=client, args=(b,)) for b in [long] * 4 + [queued] * 8]
    threads.append(threading.Thread(target=stalled, daemon=True))
    for t in threads:
        t.start()
    wait = time.time() + 10
    while health(port)[1]["running"] < 4 or health(port)[1]["queued"] < 8:
        assert time.time() < wait, f"the load did not build up: {health(port)[1]}"
        time.sleep(0.01)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=5)
    took = time.time() - signalled
    for t in threads[:-1]:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads[:-1]), "a client still waits after the server exited"
    print(f"\nSIGTERM under load: exit code {proc.returncode} after {took:.1f} s; clients: "
          f"{Counter(o if o[1].startswith('error') else (o[0], 'whole answer') for o in outcomes)}")
    assert proc.returncode == 0 and took < 5 and len(outcomes) == 12
    assert outcomes.count((200, "error: server_shutting_down")) >= 8  # the queued ones at least
    assert all(o == (200, "error: server_shutting_down") or not o[1].startswith(("error", "ended")) for o in outcomes)


@pytest.fixture(scope="module")
def tight(tiny_model_dir):
    """An in-process server with small limits, no key and a 2 s time limit, whose steps a test can slow."""
    from instructkit.generate import load_for_inference
    from instructkit.serve import Engine, create_app
    from instructkit.serve_types import ServeLimits

    loaded = load_for_inference(str(tiny_model_dir), precision="fp32")
    limits = ServeLimits(max_body_bytes=4096, max_messages=4, max_prompt_chars=300, max_stop_strings=2,
                         max_stop_chars=8, max_queue=2, request_timeout=2.0, stuck_grace=0.5)
    engine = Engine(loaded, "tiny", default_max_tokens=6, limits=limits)
    srv, thread, url = start_server(create_app(engine))
    yield {"url": url, "engine": engine, "model": loaded.model}
    srv.should_exit = True
    thread.join(timeout=10)


def slow_steps(monkeypatch, model, seconds: float, only_call: int | None = None) -> None:
    forward, calls = model.forward, [0]

    def slow(*args, **kwargs):
        calls[0] += 1
        if only_call is None or calls[0] == only_call:
            time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)


@pytest.mark.parametrize("body, flag", [
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 5}), "--max-messages"),
    (chat("x" * 301), "--max-prompt-chars"),
    (chat("hi", stop=["a", "b", "c"]), "--max-stop-strings"),
    (chat("hi", stop="123456789"), "--max-stop-chars"),
    (chat("x" * 200, stop=["a"] * 2000), "--max-body-bytes")])
def test_each_limit_is_refused_naming_the_flag_that_raises_it(tight, body, flag):
    status, answer, _ = call(tight["url"], "/v1/chat/completions", body if isinstance(body, bytes) else body.encode(),
                             key=None)
    assert status == (413 if flag == "--max-body-bytes" else 400) and flag in answer["error"]["message"], answer


def test_the_model_name_is_checked_before_anything_else(tight):
    body = json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x" * 100}] * 5}).encode()
    status, answer, _ = call(tight["url"], "/v1/chat/completions", body, key=None)
    assert status == 404 and answer["error"]["code"] == "model_not_found"


def test_past_the_queue_requests_get_429_with_retry_after_and_the_queued_ones_are_answered(tight, monkeypatch):
    slow_steps(monkeypatch, tight["model"], 0.02)
    engine = tight["engine"]
    conn, response = open_stream(tight["url"], json.dumps({"model": "tiny", "prompt": "Once upon", "max_tokens": 500,
                                                           "temperature": 0, "stream": True}).encode(), key=None)
    read_events(response, 1)
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(call, tight["url"], "/v1/chat/completions", chat(p, temperature=0), None)
                  for p in ("Say yes.", "Say no.")]
        wait_until(lambda: len(engine.scheduler.pending) == 2, 10, "two requests queued")
        status, answer, headers = call(tight["url"], "/v1/chat/completions", chat("Say yes."), key=None)
        assert status == 429 and answer["error"]["code"] == "queue_full" and "--max-queue" in answer["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        response.close()
        conn.close()
        assert [q.result(timeout=10)[0] for q in queued] == [200, 200]


def test_a_stuck_step_turns_health_503_the_request_gets_504_and_the_server_recovers(tight, monkeypatch):
    slow_steps(monkeypatch, tight["model"], 3.5, only_call=2)
    with ThreadPoolExecutor(1) as pool:
        started = time.time()
        pending = pool.submit(call, tight["url"], "/v1/chat/completions", chat("Say yes.", temperature=0), None)
        wait_until(lambda: call(tight["url"], "/health", key=None)[0] == 503, 5, "health reports the stuck step")
        assert call(tight["url"], "/health", key=None)[1]["status"] == "stuck"
        status, answer, _ = pending.result(timeout=10)
        assert status == 504 and answer["error"]["code"] == "request_timeout" and time.time() - started < 4
    wait_until(lambda: call(tight["url"], "/health", key=None)[0] == 200, 5, "health is back once the step ends")
    assert call(tight["url"], "/v1/chat/completions", chat("Say yes.", max_tokens=2), key=None)[0] == 200
