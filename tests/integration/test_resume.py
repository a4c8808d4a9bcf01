"""Kill a run at any moment, start it again: the same model, bit for bit on CPU, and the same losses."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructkit.metrics import read_metrics

# Runs the CLI; with KILL_AT=NAME:N, the Nth write of a file called NAME is cut in half and the process
# SIGKILLs itself, as a crash in the middle of writing a checkpoint would. STEP_DELAY=S slows each
# optimizer step, so a signal sent from outside lands in the middle of an epoch, not at its end.
# HOLD_UNTIL=PATH holds the run before each step after the first until PATH exists (at most 300 s), so step 1
# is logged and the run is still going however slow the machine: no race.
WRAPPER = """
import os, signal, sys, time
delay = float(os.environ.get("STEP_DELAY", "0"))
hold = os.environ.get("HOLD_UNTIL")
if delay or hold:
    import instructkit.train as tr
    step_once = tr.optimizer_step
    calls = [0]
    def slow_step(*args, **kwargs):
        deadline = time.time() + 300
        while hold and calls[0] and not os.path.exists(hold) and time.time() < deadline:
            time.sleep(0.05)
        calls[0] += 1
        out = step_once(*args, **kwargs)
        time.sleep(delay)
        return out
    tr.optimizer_step = slow_step
spec = os.environ.get("KILL_AT")
if spec:
    import safetensors.torch as st
    name, nth = spec.split(":")
    seen, original = [0], st.save_file
    def save_file(tensors, filename, *args, **kwargs):
        if os.path.basename(filename) == name:
            seen[0] += 1
            if seen[0] == int(nth):
                original(tensors, filename, *args, **kwargs)
                size = os.path.getsize(filename)
                with open(filename, "r+b") as handle:
                    handle.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(tensors, filename, *args, **kwargs)
    st.save_file = save_file
from instructkit.cli import main
sys.exit(main())
"""
STEPS = 6


def start(config: Path, *extra: str, kill_at: str | None = None, delay: float = 0,
          hold_until: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STEP_DELAY": str(delay)}
    if hold_until:
        env["HOLD_UNTIL"] = str(hold_until)
    if kill_at:
        env["KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-c", WRAPPER, "train", str(config), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def wait_for_steps(run: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while len([m for m in read_metrics(run) if "loss" in m]) < n:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)


def kill_after_steps(config: Path, run: Path, steps: int) -> None:
    """Start training, SIGKILL it once `steps` optimizer steps are logged (checkpoints exist for them)."""
    proc = start(config, delay=0.4)
    wait_for_steps(run, steps, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def resumed_mid_epoch(run: Path) -> bool:
    """The checkpoint the run resumed from was taken inside an epoch (4 micro-batches each)."""
    checkpoint = Path(json.loads((run / "manifest.json").read_text())["resumed"][0]["from_checkpoint"])
    return json.loads((checkpoint / "state.json").read_text())["batch_in_epoch"] in (1, 2, 3)


def outcome(run: Path) -> tuple[str, list[float]]:
    weights = hashlib.sha256((run / "final/adapter_model.safetensors").read_bytes()).hexdigest()
    return weights, [m["loss"] for m in read_metrics(run) if "loss" in m]


def resumable_config(tiny_config, run: Path, workers: int = 0, **train):
    return tiny_config(output_dir=str(run), lora={"dropout": 0.1},  # dropout: the RNG must be restored too
                       train={"per_device_train_batch_size": 2, "max_steps": STEPS, "save_strategy": "steps",
                              "save_steps": 1, "save_total_limit": None, "dataloader_num_workers": workers,
                              "learning_rate": 1e-2, **train})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted run's final adapter hash and per-step losses (6 steps over 1.5 epochs)."""
    import yaml

    from tests.conftest import ROWS, write_jsonl

    root = tmp_path_factory.mktemp("reference")
    data = write_jsonl(root / "train.jsonl", ROWS)
    cfg = {"run_name": "tiny", "output_dir": str(root / "run"), "seed": 1,
           "model": {"name_or_path": str(tiny_model_dir), "precision": "fp32"},  # pinned as tiny_config pins it
           "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
           "data": {"train_file": str(data), "max_length": 320},
           "train": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": STEPS,
                     "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "report_to": []}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = finish(start(path))
    assert code == 0, out
    result = outcome(root / "run")
    assert len(result[1]) == STEPS
    return result, data


def same_data(tiny_config, reference, run, **kw):
    _, data = reference
    config = resumable_config(tiny_config, run, **kw)
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["train_file"] = str(data)
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_is_bit_identical(tiny_config, tmp_path, reference, workers):
    run = tmp_path / "run"
    config = same_data(tiny_config, reference, run, workers=workers)
    kill_after_steps(config, run, 2)  # checkpoints exist for steps 1-2; killed in step 3 (mid-epoch)
    assert (run / ".instructkit.lock").is_file()  # left behind: the kernel released the lock, nobody unlocks
    code, out = finish(start(config))
    assert code == 0, out
    assert "resumed from" in out and resumed_mid_epoch(run)
    assert outcome(run) == reference[0]


def test_crash_while_writing_a_checkpoint_then_corrupted_newest(tiny_config, tmp_path, reference):
    run = tmp_path / "run"
    config = same_data(tiny_config, reference, run)
    code, out = finish(start(config, kill_at="optimizer.safetensors:4"))  # inside step 4's checkpoint
    assert code == -signal.SIGKILL, out
    checkpoints = run / "checkpoints"
    assert (checkpoints / ".step-000004.tmp").is_dir() and not (checkpoints / "step-000004").exists()
    newest = checkpoints / "step-000003/trainable.safetensors"  # and the newest complete one is damaged too
    newest.write_bytes(newest.read_bytes()[:40])
    code, out = finish(start(config))
    assert code == 0, out
    assert "ignoring step-000003: trainable.safetensors is unreadable" in out
    assert "resumed from" in out and "step-000002 at step 2" in out
    assert outcome(run) == reference[0]


def test_sigterm_writes_a_checkpoint_that_resumes_exactly(tiny_config, tmp_path, reference):
    run = tmp_path / "run"
    config = same_data(tiny_config, reference, run, save_strategy="no")
    proc = start(config, delay=0.4)
    wait_for_steps(run, 1, proc)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM, out
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert len(list((run / "checkpoints").glob("step-*/COMPLETE"))) == 1
    code, out = finish(start(config))
    assert code == 0, out
    assert resumed_mid_epoch(run)
    assert outcome(run) == reference[0]


def test_resume_refuses_a_result_changing_config(tiny_config, tmp_path, capsys):
    from instructkit.cli import main

    run = tmp_path / "run"
    config = resumable_config(tiny_config, run, max_steps=2)
    assert main(["train", str(config)]) == 0
    (run / "final").rename(run / "final-old")  # make it look unfinished: a checkpoint to resume from
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    changed = resumable_config(tiny_config, run, max_steps=2, learning_rate=0.5, logging_steps=2)
    assert main(["train", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: 0.01 -> 0.5" in err and "logging_steps" not in err  # logging does not change results
    assert main(["train", str(changed), "--allow-config-change"]) == 0
    assert main(["train", str(resumable_config(tiny_config, run, resume=False))]) == 2
    assert "train.resume is false" in capsys.readouterr().err


def test_same_seed_gives_identical_loss_curves(tiny_config, tmp_path):
    from instructkit.cli import main

    curves = []
    for name in ("a", "b"):
        config = resumable_config(tiny_config, tmp_path / name, save_strategy="no", deterministic=True)
        assert main(["train", str(config)]) == 0
        curves.append([m["loss"] for m in read_metrics(tmp_path / name)])
    assert curves[0] == curves[1]


def test_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tiny_config, tmp_path):
    from instructkit.checkpoint import complete_checkpoints, verify_checkpoint

    run = tmp_path / "run"
    config = resumable_config(tiny_config, run, max_steps=50)
    proc = start(config, delay=2.0)
    wait_for_steps(run, 2, proc)
    time.sleep(0.3)  # into the 2 s pause of step 3, so both signals land before its checkpoint
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # the first asks for a checkpoint after this step; the second must not wait for it
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc)
    assert code == 130, out
    assert "send it again to stop at once" in out
    checkpoints = complete_checkpoints(run / "checkpoints")
    assert checkpoints and all(verify_checkpoint(p) is None for p in checkpoints)
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    code, out = finish(start(config, "train.max_steps=4", "--allow-config-change"))  # resumes from what was kept
    assert code == 0 and "resumed from" in out, out


def test_a_burst_of_signals_still_exits_130(tiny_config, tmp_path):
    """Ctrl-C hammered while the run checkpoints, reports and shuts down: wherever each lands,
    the exit code is 130 (never death by SIGINT) and every complete checkpoint verifies."""
    from instructkit.checkpoint import complete_checkpoints, verify_checkpoint

    run = tmp_path / "run"
    proc = start(resumable_config(tiny_config, run, max_steps=50), delay=0.05)
    wait_for_steps(run, 2, proc)
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    code, out = finish(proc)
    assert code == 130, out
    assert all(verify_checkpoint(p) is None for p in complete_checkpoints(run / "checkpoints"))


def test_a_second_train_on_a_running_directory_is_refused_and_the_first_finishes(tiny_config, tmp_path, reference):
    run = tmp_path / "run"
    config = same_data(tiny_config, reference, run)
    gate = tmp_path / "second-done"
    first = start(config, hold_until=gate)  # held after step 1 until the second train has answered
    wait_for_steps(run, 1, first)
    code, out = finish(start(config))
    gate.touch()
    assert code == 2, out
    assert f"is in use by the training process pid {first.pid}" in out and "Traceback" not in out
    code, out = finish(first)
    assert code == 0, out
    assert outcome(run) == reference[0]  # the first run was not disturbed


# One kind of damage end to end; every kind is refused in tests/unit/test_checkpoint_and_eval.py.
def test_a_tampered_newest_checkpoint_is_skipped_with_its_reason(tiny_config, tmp_path, reference):
    tamper = {"world_size": 10**9}
    run = tmp_path / "run"
    config = same_data(tiny_config, reference, run)
    kill_after_steps(config, run, 3)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = json.loads((newest / "state.json").read_text())
    state.update(tamper)
    (newest / "state.json").write_text(json.dumps({k: v for k, v in state.items() if v is not None}))
    code, out = finish(start(config))
    assert code == 0, out
    assert f"ignoring {newest.name}: state.json is not valid" in out
    assert outcome(run) == reference[0]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_config, tmp_path, capsys):
    from instructkit.cli import main
    from tests.conftest import tree_digest

    project = tmp_path / "project"  # a user's folder that happens to hold a config.yaml and a manifest.json
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "config.yaml").write_text("mine: true\n")
    (project / "manifest.json").write_text('{"name": "my project"}\n')
    (project / "notes.md").write_text("notes\n")
    before = tree_digest(project)
    for flag in ("--overwrite", "--allow-config-change"):
        assert main(["train", str(tiny_config(output_dir=str(project))), flag]) == 2
        assert "holds no instructkit run" in capsys.readouterr().err
        assert tree_digest(project) == before


def test_overwrite_of_a_run_removes_only_what_runs_create(tiny_config, finished_tiny_run):
    import shutil

    from instructkit.cli import main

    config = tiny_config()
    run = config.parent / "run"
    shutil.copytree(finished_tiny_run, run)  # a finished run of this config
    assert (run / ".instructkit-run").is_file()
    (run / "my-notes.txt").write_text("keep me\n")
    assert main(["train", str(config), "--overwrite"]) == 0
    assert (run / "my-notes.txt").read_text() == "keep me\n" and (run / "final").is_dir()


SIGNAL_IN_SAVE = """
import os, signal, sys
import instructkit.train as tr
original = tr.save_final
def save_final(*args, **kwargs):  # Ctrl-C arrives while final/ is being written, after the last step
    os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)
tr.save_final = save_final
from instructkit.cli import main
sys.exit(main())
"""


def test_a_signal_after_the_last_step_lets_final_be_saved(tiny_config, tmp_path):
    config = tiny_config(output_dir=str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-c", SIGNAL_IN_SAVE, "train", str(config)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SIGINT came after the last step: final/ is saved and the run is complete" in out.stdout
    assert (tmp_path / "run/final/adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "completed"
