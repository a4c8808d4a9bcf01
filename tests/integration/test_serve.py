"""`instructkit serve` on 127.0.0.1, called with the official openai client: chat, streaming,
completions, batched concurrent requests, keys, strict types, stop strings, and faults that used to wedge
the server (a generation that raises, a client that leaves mid-stream). Limits, the full queue, a stuck
step, load and SIGTERM: test_serve_load.py."""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai  # the dev extra installs it: a missing client is a failure, not a skip
import pytest

from tests.conftest import free_port

KEY = "test-key-123"


def start_server(app) -> tuple:
    """uvicorn in a thread on a free 127.0.0.1 port; returns (server, thread, url)."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    return srv, thread, f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The random-weight tiny model, fp32: it answers with many varied tokens (the trained tiny run mostly
    ends at once), so comparisons of answers can fail. Its template is the builtin one a run trains with."""
    from instructkit.generate import load_for_inference
    from instructkit.serve import Engine, create_app

    loaded = load_for_inference(str(tiny_model_dir), precision="fp32")
    engine = Engine(loaded, "tiny", default_max_tokens=12)
    srv, thread, url = start_server(create_app(engine, api_key=KEY))
    yield {"url": url, "loaded": loaded, "engine": engine}
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


def test_models_and_chat_with_the_trained_template(client, server):
    from instructkit.data.formats import Message
    from instructkit.generate import generate

    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say yes."}],
                                           max_tokens=8, temperature=0)
    expected = generate(server["loaded"], [(Message("user", "Say yes."),)], max_new_tokens=8)[0]
    assert reply.choices[0].message.content.strip() == expected  # same template, same tokens as `generate`
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0


def test_streaming_gives_the_same_text_as_a_whole_reply(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completions_plain_and_streamed(client):
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=6, temperature=0, stream=True))
    assert streamed == whole.choices[0].text


def test_concurrent_requests_each_get_their_own_answer(client):
    prompts = ["Say yes.", "Say no.", "Add one. 2", "Name a fruit.", "Repeat the word. cat", "Say yes."]

    def ask(prompt):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=6, temperature=0).choices[0].message.content

    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(ask, prompts)) == sequential


def test_wrong_key_unknown_model_and_too_long_prompt_are_4xx(client, server):
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 5000}])
    assert err.value.body["code"] == "context_length_exceeded" and "maximum context length" in err.value.message


def call(url: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple:
    """(status, JSON body, headers) of one request, errors included."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def raw(server, body: bytes, path="/v1/chat/completions", key=KEY):
    return call(server["url"], path, body, key)[:2]


@pytest.mark.parametrize("body", [b"{not json", b'{"model": "tiny"}', b'{"model": "tiny", "messages": []}',
                                  b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}',
                                  b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
                                  b'[1, 2]'])
def test_malformed_requests_get_openai_shaped_400s_and_the_server_lives(server, body):
    status, answer = raw(server, body)
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    status, answer = raw(server, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}')
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_the_cli_serves_on_localhost_only_by_default_with_a_key_from_a_file_that_ps_does_not_show(tiny_lora_run,
                                                                                                  tmp_path):
    import psutil

    port, secret = free_port(), "file-key-7f3a"
    (tmp_path / "key").write_text(secret + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", str(tiny_lora_run), "--port", str(port),
                             "--api-key-file", str(tmp_path / "key"), "--precision", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not _listening(port):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        assert call(f"http://127.0.0.1:{port}", "/v1/models", key=None)[0] == 401
        status, body, _ = call(f"http://127.0.0.1:{port}", "/v1/models", key=secret)
        assert status == 200 and body["data"][0]["id"] == "run"
        assert not any(secret in arg for p in psutil.process_iter(["cmdline"]) for arg in p.info["cmdline"] or [])
        bound = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"}
        assert bound == {"127.0.0.1"}, bound
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def chat(text: str, **fields) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": text}], **fields}).encode()


@pytest.fixture
def jobs(server, monkeypatch):
    """Every job the server queues from now on, to look at what generation did."""
    seen, scheduler = [], server["engine"].scheduler
    submit = scheduler.submit
    monkeypatch.setattr(scheduler, "submit", lambda job: (seen.append(job), submit(job))[1])
    return seen


def open_stream(url: str, body: bytes, path: str = "/v1/completions", key: str | None = KEY):
    """A raw streaming request, so the test decides when to read and when to hang up."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def read_events(response, count: int) -> list[str]:
    events = []
    while len(events) < count:
        line = response.fp.readline().decode()
        assert line, "the stream ended early"
        if line.startswith("data: "):
            events.append(line[6:].strip())
    return events


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.01)


def test_queued_requests_are_batched_and_answer_exactly_as_one_at_a_time(server, jobs):
    """Greedy, streamed and whole alike, in one batch of 8: the same text as each alone (fp32, tiny model)."""
    prompts = ["Say yes.", "Say no.", "Add one. 2", "Name a fruit.", "Repeat the word. cat", "Name a color.",
               "Add one. 7", "Repeat the word. dog"]
    bodies = [chat(p, max_tokens=6 + i, temperature=0, stream=i % 2 == 1) for i, p in enumerate(prompts)]

    def text(status_body):
        if status_body.startswith(b"data:"):
            chunks = [json.loads(x[6:]) for x in status_body.decode().split("\n\n") if x.startswith("data: {")]
            return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks[-1]["choices"][0]
        answer = json.loads(status_body)["choices"][0]
        return answer["message"]["content"], answer

    def ask(body):
        request = urllib.request.Request(server["url"] + "/v1/chat/completions", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            content, choice = text(response.read())
        return content, choice["finish_reason"]

    alone = [ask(b) for b in bodies]
    engine = server["engine"]
    before = engine.scheduler.batch_sizes[8]
    # Hold the model with another request, so that the eight queue up and start together.
    conn, response = open_stream(server["url"], json.dumps({"model": "tiny", "prompt": "Once upon", "max_tokens": 900,
                                                            "temperature": 0, "stream": True}).encode())
    read_events(response, 2)
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(ask, b) for b in bodies]
        wait_until(lambda: len(engine.scheduler.pending) == 8, 30, "eight requests queued")
        response.close()
        conn.close()
        assert [a.result(timeout=60) for a in answers] == alone
    assert engine.scheduler.batch_sizes[8] == before + 1


def test_a_client_that_leaves_mid_stream_frees_the_model_within_one_token(server, jobs, client):
    conn, response = open_stream(server["url"], json.dumps({"model": "tiny", "prompt": "Once upon", "max_tokens": 900,
                                                            "temperature": 0, "stream": True}).encode())
    read_events(response, 3)
    response.close()
    conn.close()
    engine = server["engine"]
    wait_until(lambda: not engine.scheduler.running, 10, "the generation stopped after the client left")
    job = jobs[-1]
    assert job.tokens_at_cancel is not None and job.tokens - job.tokens_at_cancel <= 1 and job.tokens < 900
    reply = client.completions.create(model="tiny", prompt="Once upon", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_while_queued_is_dropped_before_it_runs(server, jobs, stream):
    """Noticed from the connection itself, not from a failed send: a queued request sends nothing."""
    long = json.dumps({"model": "tiny", "prompt": "Once upon", "max_tokens": 900, "temperature": 0, "stream": True})
    conn, response = open_stream(server["url"], long.encode())
    read_events(response, 1)
    host, port = server["url"].removeprefix("http://").split(":")
    queued = http.client.HTTPConnection(host, int(port), timeout=30)
    queued.request("POST", "/v1/chat/completions", chat("Say yes.", max_tokens=5, temperature=0, stream=stream),
                   {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    scheduler = server["engine"].scheduler
    wait_until(lambda: len(scheduler.pending) == 1, 10, "the second request queued")
    queued.close()
    wait_until(lambda: jobs[-1].cancelled, 10, "the queued request cancelled when its client left")
    response.close()
    conn.close()
    wait_until(lambda: not scheduler.running and not scheduler.pending, 10, "the server idle again")
    assert jobs[-1].tokens == 0 and jobs[-1].ended


def test_a_generation_that_raises_ends_its_stream_with_an_error_event_and_the_next_request_is_answered(
        server, client, monkeypatch):
    base = server["loaded"].model
    forward, calls = base.forward, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("injected failure: secret internals")
        return forward(*args, **kwargs)

    monkeypatch.setattr(base, "forward", failing)
    texts = []
    with pytest.raises(openai.APIError) as err:
        for chunk in client.completions.create(model="tiny", prompt="Once upon", max_tokens=50, temperature=0,
                                               stream=True):
            texts.append(chunk.choices[0].text)
    assert calls[0] == 4 and "".join(texts)  # three tokens streamed, then the error event
    assert err.value.body["type"] == "server_error" and "internal error (id " in err.value.message
    assert "secret" not in err.value.message
    reply = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5
    assert call(server["url"], "/health", key=None)[0] == 200


def test_an_internal_error_is_a_500_with_an_id_that_the_log_has_with_its_traceback(server, monkeypatch, caplog):
    def broken(request):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server["engine"], "chat_ids", broken)
    status, body, _ = call(server["url"], "/v1/chat/completions", chat("hi"))
    assert status == 500 and body["error"]["type"] == "server_error" and "secret" not in json.dumps(body)
    error_id = body["error"]["message"].split("(id ")[1].split(")")[0]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and "secret internals" in caplog.text and logged[0].exc_info


@pytest.mark.parametrize("fields, param", [({"max_tokens": True}, "max_tokens"), ({"temperature": "0.5"}, "temperature"),
                                           ({"seed": 2**70}, "seed"), ({"seed": -1}, "seed"), ({"n": 1.0}, "n"),
                                           ({"stream": "yes"}, "stream"), ({"stop": 5}, "stop")])
def test_types_are_strict_and_the_seed_fits_64_bits(server, fields, param):
    status, body, _ = call(server["url"], "/v1/chat/completions", chat("hi", **fields))
    assert status == 400 and body["error"]["param"].split(".")[0] == param, body


def test_an_empty_stop_string_is_ignored_and_a_real_one_cuts_whole_and_streamed_replies_alike(client):
    def both(**kw):
        whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0, **kw)
        streamed = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0,
                                                  stream=True, **kw))
        assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
        assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        return whole.choices[0]

    plain = both()
    assert both(stop="").text == plain.text == both(stop=["", ""]).text
    stop = plain.text[4:6]
    cut = both(stop=[stop, "\u2603\u2603"])
    assert cut.text == plain.text[:plain.text.index(stop)] and cut.finish_reason == "stop"


def test_every_route_but_health_needs_the_key(server):
    for path in ("/openapi.json", "/docs", "/v1/models", "/v1/models/tiny", "/no/such/route"):
        status, body, headers = call(server["url"], path, key=None)
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["WWW-Authenticate"] == "Bearer"
    assert call(server["url"], "/openapi.json")[0] == 200
    status, body, _ = call(server["url"], "/health", key=None)
    assert status == 200 and body["status"] == "ok"


def test_the_serve_flags_document_the_limits_defaults_and_a_key_on_the_command_line_warns(tmp_path, capsys):
    import dataclasses
    import re

    from instructkit.cli import main
    from instructkit.serve_cli import SERVE_LIMIT_FLAGS
    from instructkit.serve_types import ServeLimits

    defaults = {f.name: f.default for f in dataclasses.fields(ServeLimits)}
    for field, (name, _, what) in SERVE_LIMIT_FLAGS.items():  # the CLI states them without importing them
        assert name == field.replace("_", "-") and float(re.search(r"\(default ([\d.]+)\)", what)[1]) == defaults[field]
    assert main(["serve", str(tmp_path / "missing"), "--api-key", "k"]) == 2
    assert "--api-key shows the key to anyone who can list processes" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing"), "--api-key-file", str(tmp_path / "nokey")]) == 2
    assert "--api-key-file" in capsys.readouterr().err
