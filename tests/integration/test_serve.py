"""`instructkit serve` on 127.0.0.1, called with the official openai client: chat, streaming,
completions, concurrent requests, a wrong key, malformed JSON, an unknown model, a too-long prompt."""

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

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_lora_run):
    import uvicorn

    from instructkit.generate import load_for_inference
    from instructkit.serve import Engine, create_app

    loaded = load_for_inference(str(tiny_lora_run), precision="fp32")
    port = free_port()
    app = create_app(Engine(loaded, "tiny", default_max_tokens=12), api_key=KEY)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "loaded": loaded}
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


def raw(server, body: bytes, path="/v1/chat/completions", key=KEY):
    request = urllib.request.Request(server["url"] + path, data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("body", [b"{not json", b'{"model": "tiny"}', b'{"model": "tiny", "messages": []}',
                                  b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}',
                                  b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
                                  b'[1, 2]'])
def test_malformed_requests_get_openai_shaped_400s_and_the_server_lives(server, body):
    status, answer = raw(server, body)
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    status, answer = raw(server, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}')
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_the_cli_serves_on_localhost_only_by_default(tiny_lora_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", str(tiny_lora_run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                    assert json.loads(response.read())["data"][0]["id"] == "run"
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.2)
        import psutil

        bound = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"}
        assert bound == {"127.0.0.1"}, bound
    finally:
        proc.terminate()
        proc.wait(timeout=30)
