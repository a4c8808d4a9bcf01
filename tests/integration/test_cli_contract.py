"""Exit codes and messages of the real `python -m instructkit` process, and what it leaves on disk."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from instructkit.cli import main
from tests.conftest import tree_digest, write_jsonl


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "instructkit", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kwargs)


def test_help_is_instant_and_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "validate", "generate", "chat", "eval", "env"):
        assert command in result.stdout


@pytest.mark.parametrize("case", ["missing_data", "unknown_key", "bad_row", "bad_model", "missing_config"])
def test_bad_input_exits_2_with_one_paragraph_and_no_traceback(tiny_config, tmp_path, case):
    if case == "missing_data":
        config, needle = tiny_config(data={"train_file": str(tmp_path / "nope.jsonl")}), "data file not found"
    elif case == "unknown_key":
        config, needle = tiny_config(train={"learning_rat": 1}), "train.learning_rat: unknown key"
    elif case == "bad_row":
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
        config, needle = tiny_config(data={"train_file": str(bad)}), f"{bad}:2: missing field 'output'"
    elif case == "bad_model":
        config, needle = tiny_config(model={"name_or_path": str(tmp_path / "no-model")}), "model.name_or_path"
    else:
        config, needle = tmp_path / "absent.yaml", "config file not found"
    result = run_cli("train", str(config))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_cli("--debug", "train", str(config))
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_existing_run_is_never_touched_by_a_refused_or_bad_run(tiny_config, capsys):
    config = tiny_config()
    assert main(["train", str(config)]) == 0
    run = config.parent / "run"
    before = tree_digest(run)
    assert main(["train", str(config)]) == 2  # same run again, no --overwrite
    assert "already holds this run" in capsys.readouterr().err
    other = tiny_config(train={"learning_rate": 0.5})
    assert main(["train", str(other)]) == 2
    assert "train.learning_rate: 0.01 -> 0.5" in capsys.readouterr().err
    broken = tiny_config(data={"train_file": "missing.jsonl"})
    assert main(["train", str(broken), "--overwrite"]) == 2  # bad input found before the old run is removed
    assert tree_digest(run) == before


def test_overwrite_replaces_the_run_and_refuses_foreign_directories(tiny_config, tmp_path):
    config = tiny_config()
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), "--overwrite"]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["train", str(tiny_config(output_dir=str(foreign))), "--overwrite"]) == 2
    assert (foreign / "notes.txt").read_text() == "mine"


def test_validate_checks_without_training(tiny_config, capsys):
    config = tiny_config()
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "8 train rows" in out and "local directory" in out
    assert not (config.parent / "run").exists()
    assert main(["validate", str(config), "model.load_in_4bit=true"]) == 2  # no CUDA here


def test_generate_argument_errors(tiny_config, capsys):
    config = tiny_config()
    assert main(["train", str(config)]) == 0
    run = str(config.parent / "run")
    assert main(["generate", run]) == 2
    assert main(["generate", run, "--file", "x.jsonl"]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["generate", str(config.parent)]) == 2  # neither a run nor a model


def test_ctrl_c_writes_a_checkpoint_and_exits_130(tiny_config):
    config = tiny_config(train={"max_steps": 100000, "logging_steps": 1})
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = config.parent / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    checkpoints = list((config.parent / "run" / "checkpoints").glob("step-*/COMPLETE"))
    assert len(checkpoints) == 1
    assert json.loads((config.parent / "run" / "manifest.json").read_text())["status"] == "interrupted"


def test_env_json_and_require_gpu():
    result = run_cli("env", "--json")
    assert result.returncode == 0
    info = json.loads(result.stdout)
    assert {"versions", "cuda_available", "gpu_count", "gpus", "cpu", "free_disk_gib"} <= set(info)
    table = run_cli("env")
    assert "torch.cuda.is_available()" in table.stdout and "CPU bf16 features" in table.stdout
    if not info["cuda_available"]:
        required = run_cli("env", "--require-gpu")
        assert required.returncode == 1 and "no usable GPU" in required.stderr
