"""instructkit studio at the HTTP level: run names never lead out of --runs (not by `..`, not by a symlink), the
token rule off 127.0.0.1, the Host/Origin/JSON rules on it, the form's YAML round trip and its validation
messages, the data preview's bad-row report, a run trained from a terminal shown with its curves and report,
and bad command-line input exiting 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from instructkit.cli import main
from instructkit.config import load_config
from tests.conftest import ROWS, free_port, tiny_run_config, wait_listening, write_jsonl


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from instructkit.studio.security import Gate
    from instructkit.studio.server import Studio, create_app

    (tmp_path / "runs").mkdir()
    studio = Studio(runs=str(tmp_path / "runs"), gate=Gate("127.0.0.1", 7860, None))
    return TestClient(create_app(studio), base_url="http://127.0.0.1:7860")


def post(client, path: str, body: dict, **headers):
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json", **headers})


@pytest.fixture
def run_from_a_terminal(client, finished_tiny_run, tmp_path) -> Path:
    """A run trained with `instructkit train` (as `make demo` does), then `instructkit report`."""
    run = tmp_path / "runs" / "quick"
    shutil.copytree(finished_tiny_run, run)
    assert main(["report", str(run)]) == 0
    return run


def test_names_with_dots_absolute_paths_or_too_deep_are_refused(client):
    for name in ("../x", "a/../../b", "/etc", "..", ".hidden", "a//b", "a/b/c/d", "x y", "a\\..\\b"):
        r = client.get("/api/run", params={"name": name})
        assert r.status_code == 400 and "is not a run name" in r.json()["error"], name
        assert post(client, "/api/run/delete", {"name": name, "confirm": name}).status_code == 400, name


def test_a_symlink_out_of_the_runs_directory_is_neither_listed_nor_opened_nor_deleted(client, run_from_a_terminal,
                                                                                        tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(run_from_a_terminal, outside)
    (tmp_path / "runs" / "evil").symlink_to(outside)
    (tmp_path / "runs" / "nest").mkdir()
    (tmp_path / "runs" / "nest" / "evil").symlink_to(outside)
    assert [r["name"] for r in client.get("/api/runs").json()] == ["quick"]
    for name in ("evil", "nest/evil"):
        for path in ("/run", "/api/run", "/run/report", "/chat", "/export"):
            r = client.get(path, params={"name": name})
            assert r.status_code == 404 and "outside the runs directory" in r.text, (path, name)
        for path, body in (("/api/run/delete", {"confirm": name}), ("/api/run/stop", {}), ("/api/run/resume", {}),
                           ("/api/jobs/gguf", {}), ("/api/chat", {"prompt": "hi"})):
            assert post(client, path, {"name": name, **body}).status_code == 404, (path, name)
    assert (outside / "final").is_dir() and (outside / "manifest.json").is_file()  # untouched
    r = post(client, "/api/form/check", {"values": {"run_name": "../x"}})
    assert "cannot name the run's folder" in r.json()["errors"]["run_name"][0]["message"]


def test_delete_needs_the_name_as_confirmation_and_an_instructkit_run(client, run_from_a_terminal, tmp_path):
    assert post(client, "/api/run/delete", {"name": "quick"}).status_code == 400
    (tmp_path / "runs" / "mine").mkdir()
    (tmp_path / "runs" / "mine" / "notes.txt").write_text("mine")
    assert post(client, "/api/run/delete", {"name": "mine", "confirm": "mine"}).status_code == 404
    assert (tmp_path / "runs/mine/notes.txt").is_file()
    (run_from_a_terminal / "notes.txt").write_text("my own file")  # kept: only what runs create is removed
    r = post(client, "/api/run/delete", {"name": "quick", "confirm": "quick"})
    assert r.status_code == 200 and r.json()["left"] == ["notes.txt"]
    assert [p.name for p in run_from_a_terminal.iterdir()] == ["notes.txt"]


def test_a_run_trained_from_a_terminal_shows_its_curves_status_and_report(client, run_from_a_terminal):
    page = client.get("/").text
    assert 'href="/run?name=quick"' in page and "completed" in page
    state = client.get("/api/run", params={"name": "quick"}).json()
    assert state["run"]["status"] == "completed" and state["run"]["has_report"]
    assert [r["step"] for r in state["metrics"]["records"] if "loss" in r] == [1, 2, 3, 4]
    later = client.get("/api/run", params={"name": "quick", "have": 2, "last_step": 2}).json()["metrics"]
    assert not later["reset"] and [r["step"] for r in later["records"]] == [3, 4]
    rewritten = client.get("/api/run", params={"name": "quick", "have": 2, "last_step": 9}).json()["metrics"]
    assert rewritten["reset"] and len(rewritten["records"]) == 4  # a resumed run rewrote metrics.jsonl
    run_page = client.get("/run", params={"name": "quick"}).text
    assert 'id="report-link"' in run_page and 'id="report-link" href="/run/report?name=quick" hidden' not in run_page
    report = client.get("/run/report", params={"name": "quick"})
    assert report.status_code == 200 and "<h2>Loss</h2>" in report.text


def test_token_off_loopback_cookie_after_it_and_403_otherwise(tmp_path):
    port = free_port()
    env = {**os.environ, "INSTRUCTKIT_STUDIO_TOKEN": "s3cret-token"}
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "studio", "--runs", str(tmp_path / "runs"),
                             "--host", "0.0.0.0", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        assert f":{port}/?token=s3cret-token" in first
        base = f"http://127.0.0.1:{port}"
        wait_listening(port)
        assert fetch(f"{base}/")[0] == 403 and fetch(f"{base}/api/runs")[0] == 403
        assert fetch(f"{base}/static/studio.js")[0] == 403
        assert fetch(f"{base}/?token=wrong")[0] == 403
        code, headers, _ = fetch(f"{base}/new?token=s3cret-token", follow=False)
        assert code == 303 and headers["location"] == "/new"  # the token leaves the address bar
        cookie = headers["set-cookie"].split(";")[0]
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]
        assert fetch(f"{base}/api/runs", Cookie=cookie)[0] == 200
        assert fetch(f"{base}/api/runs", Authorization="Bearer s3cret-token")[0] == 200
        assert fetch(f"{base}/api/runs", Authorization="Bearer nope")[0] == 403
        # A stale cookie (an earlier studio's token) does not shadow the token in the address, and a wrong
        # token in the address neither admits nor replaces a good cookie; no redirect leaves the site.
        stale = "instructkit_studio_token=old-token"
        code, headers, _ = fetch(f"{base}/?token=s3cret-token", follow=False, Cookie=stale)
        assert code == 303 and headers["location"] == "/"
        code, headers, _ = fetch(f"{base}/?token=junk", follow=False, Cookie=cookie)
        assert code == 200 and "set-cookie" not in headers
        code, headers, _ = fetch(f"{base}//evil.example/x?token=s3cret-token", follow=False)
        assert code == 303 and headers["location"] == "/evil.example/x"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def fetch(url: str, follow: bool = True, data: bytes | None = None, **headers) -> tuple[int, dict, str]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(*([] if follow else [NoRedirect]))
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


def test_on_loopback_other_hosts_cross_site_posts_and_form_encodings_are_refused(client):
    assert client.get("/", headers={"Host": "evil.example:7860"}).status_code == 403  # DNS rebinding
    assert client.get("/", headers={"Host": "localhost:7860"}).status_code == 200
    body = {"values": {"run_name": "x"}}
    assert post(client, "/api/form/check", body, Origin="http://evil.example").status_code == 403
    assert post(client, "/api/form/check", body, Origin="http://127.0.0.1:7860").status_code == 200
    r = client.post("/api/run/delete", data={"name": "x", "confirm": "x"})  # what a cross-site HTML form sends
    assert r.status_code == 415


def test_bad_command_line_input_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["studio", "--runs", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    port = free_port()
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert main(["studio", "--runs", str(tmp_path / "runs"), "--port", str(port)]) == 2
    assert "choose another --port" in capsys.readouterr().err
    os.environ["INSTRUCTKIT_STUDIO_TOKEN"] = " "
    try:
        assert main(["studio", "--runs", str(tmp_path / "runs"), "--host", "0.0.0.0", "--port", str(port)]) == 2
    finally:
        del os.environ["INSTRUCTKIT_STUDIO_TOKEN"]
    assert "set but empty" in capsys.readouterr().err


def values_for(tmp_path: Path, tiny_model_dir: Path, data: Path) -> dict:
    from instructkit.studio.form import values_from_config

    cfg = tiny_run_config(tmp_path, tiny_model_dir, data)
    cfg.update(run_name="tiny", output_dir=None)
    return values_from_config(cfg)


def test_the_yaml_preview_round_trips_and_is_what_train_loads(client, tmp_path, tiny_model_dir):
    values = values_for(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", ROWS))
    first = post(client, "/api/form/check", {"values": values}).json()
    assert first["errors"] == {}
    again = post(client, "/api/form/parse", {"yaml": first["yaml"]}).json()["values"]
    second = post(client, "/api/form/check", {"values": again}).json()
    assert second["yaml"] == first["yaml"] and again == {**values, "output_dir": again["output_dir"]}
    (tmp_path / "c.yaml").write_text(first["yaml"])
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.output_dir == f"{tmp_path}/runs/tiny" and cfg.train.max_steps == 4 and cfg.lora.r == 4
    assert "per_device_eval_batch_size" not in first["yaml"]  # defaults are left out


def test_validation_names_the_key_the_message_and_the_fix(client, tmp_path, tiny_model_dir):
    values = values_for(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", ROWS))
    bad = {**values, "train.learning_rate": "-1", "lora.target_modules": "[q_proj", "model.name_or_path": ""}
    errors = post(client, "/api/form/check", {"values": bad}).json()["errors"]
    assert errors["train.learning_rate"][0] == {
        "message": "Input should be 'auto' (got -1) -- or: Input should be greater than 0 (got -1)",
        "fix": "expected auto | float (gt 0); default auto"}
    assert "not valid YAML" in errors["lora.target_modules"][0]["message"]
    assert "required key is missing" in errors["model.name_or_path"][0]["message"]
    rule = {**values, "data.val_size": "0", "train.eval_steps": "5"}  # a rule between keys: shown at the first it names
    errors = post(client, "/api/form/check", {"values": rule}).json()["errors"]
    assert list(errors) == ["train.eval_steps"] and "no eval data" in errors["train.eval_steps"][0]["message"]
    assert post(client, "/api/runs/start", {"values": bad}).status_code == 400
    assert not (tmp_path / "runs" / "tiny").exists()


def test_data_preview_lists_bad_rows_with_file_and_line(client, tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, ROWS)
    data.write_text(data.read_text() + '{"instruction": "Say maybe."}\n')
    values = values_for(tmp_path, tiny_model_dir, data)
    report = post(client, "/api/data/preview", {"values": values, "n": 2}).json()
    assert report["rows"] == 9 and report["examples_kept"] == 8 and report["stops_training"]
    assert report["bad"] == [{"where": f"{data}:9", "reason": "missing field", "detail": "missing field 'output'"}]
    assert [s["text"] for s in report["examples"][0]["spans"] if s["supervised"]] == ["yes</s>"]
    assert sum(report["histogram"]["counts"]) == 8
    missing = post(client, "/api/data/preview", {"values": {**values, "data.train_file": "nope.jsonl"}}).json()
    assert "nope.jsonl" in missing["error"]


def test_runs_started_by_the_studio_go_on_when_it_stops_and_a_new_studio_finds_them(tmp_path, tiny_model_dir):
    from instructkit.studio.runs import lock_holder

    values = values_for(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", ROWS))
    values.update({"run_name": "long", "train.max_steps": "60"})
    studios = []
    try:
        for _ in range(2):
            port = free_port()
            studios.append(subprocess.Popen([sys.executable, "-m", "instructkit", "studio", "--runs", "runs", "--port",
                                             str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL))
            wait_listening(port)
            base = f"http://127.0.0.1:{port}"
            if len(studios) == 1:
                body = json.dumps({"values": values}).encode()
                assert fetch(f"{base}/api/runs/start", data=body, **{"Content-Type": "application/json"})[0] == 200
                wait_for(lambda: lock_holder(tmp_path / "runs/long"), 60)
                studios[0].send_signal(2)  # Ctrl-C in the studio's terminal
                assert studios[0].wait(timeout=15) == 0
                assert lock_holder(tmp_path / "runs/long")  # the run trains on
        assert wait_for(lambda: json.loads(fetch(f"{base}/api/run?name=long")[2])["run"]["status"] == "completed", 180)
    finally:
        for proc in studios:
            proc.kill()
            proc.wait()
        pid = lock_holder(tmp_path / "runs/long") if (tmp_path / "runs/long").is_dir() else None
        if pid:
            os.killpg(os.getpgid(pid), 9)


def wait_for(condition, timeout: float):
    import time

    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.3)
    return True
