"""Defaults resolved at start, and validation that steers: best weights in final/, early stopping, resume."""

import json
import os
import signal

import torch
import yaml
from safetensors.torch import load_file

import instructkit.train as train_module
from instructkit.cli import main
from instructkit.metrics import read_metrics
from tests.conftest import write_jsonl

# Eval losses by evaluation: the best is the third (step 3), then three worse ones stop the run at step 6.
SCRIPT = [5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0, 4.1]


def scripted_eval(monkeypatch, start: int = 0) -> list[int]:
    """Replace the eval loss with SCRIPT (from evaluation `start`); returns the list of calls made."""
    calls: list[int] = []

    def fake(*_args, **_kwargs) -> dict:
        calls.append(start + len(calls))
        return {"eval_loss": SCRIPT[calls[-1]], "eval_accuracy": 0.5, "eval_exact_match": 0.25}

    monkeypatch.setattr(train_module, "eval_metrics", fake)
    return calls


def steering_config(tiny_config, run, **train):
    return tiny_config(output_dir=str(run), lora={"dropout": 0.1},
                       data={"eval_file": yaml.safe_load(tiny_config().read_text())["data"]["train_file"]},
                       train={"per_device_train_batch_size": 2, "max_steps": 10, "eval_steps": 1,
                              "save_strategy": "steps",
                              "save_steps": 1, "save_total_limit": None, "logging_steps": 1, "best_metric": "eval_loss",
                              "early_stopping_patience": 3,
                              **train})


def manifest(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


def adapter_of_final(run) -> dict:
    return load_file(str(run / "final/adapter_model.safetensors"))


def best_weights(run) -> dict:
    # best/ holds parameter names of the live peft model ("...lora_A.default.weight"); final/ drops the adapter name
    return {k.replace(".default", ""): v for k, v in load_file(str(run / "best/trainable.safetensors")).items()}


def test_final_holds_the_best_weights_and_training_stops_early(tiny_config, tmp_path, monkeypatch, capsys):
    scripted_eval(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", str(steering_config(tiny_config, run))]) == 0
    out = capsys.readouterr().out
    m = manifest(run)
    assert m["best"] == {"step": 3, "eval_loss": 3.0} and m["last_step"] == 6 and m["stopped_early"] is True
    assert m["final_weights"] == "best" and "early stopping at step 6" in out
    assert json.loads((run / "best/best.json").read_text())["step"] == 3
    final, best = adapter_of_final(run), best_weights(run)
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    assert main(["report", str(run)]) == 0
    report = (run / "report/report.md").read_text()
    assert "| final/ | the best weights, step 3 (eval_loss 3.0000); stopped early at step 6 |" in report


def test_final_weights_last_keeps_the_last_step(tiny_config, tmp_path, monkeypatch):
    scripted_eval(monkeypatch)
    run = tmp_path / "run"
    config = steering_config(tiny_config, run, final_weights="last", early_stopping_patience=None)
    assert main(["train", str(config)]) == 0
    m = manifest(run)
    assert m["final_weights"] == "last" and m["last_step"] == 10 and m["stopped_early"] is False
    assert m["best"] == {"step": 3, "eval_loss": 3.0}  # still reported
    assert not (run / "best").exists()  # nothing to keep on disk


def test_interrupted_and_resumed_run_chooses_exactly_like_an_uninterrupted_one(tiny_config, tmp_path, monkeypatch):
    scripted_eval(monkeypatch)
    straight = tmp_path / "straight"
    assert main(["train", str(steering_config(tiny_config, straight))]) == 0

    original = train_module.optimizer_step

    def interrupt_at_step_4(*args, **kwargs):
        out = original(*args, **kwargs)
        if args[6] == 4:  # the step number being taken
            os.kill(os.getpid(), signal.SIGINT)
        return out

    scripted_eval(monkeypatch)
    monkeypatch.setattr(train_module, "optimizer_step", interrupt_at_step_4)
    resumed = tmp_path / "resumed"
    config = steering_config(tiny_config, resumed)
    assert main(["train", str(config)]) == 130
    state = json.loads((resumed / "checkpoints/step-000004/state.json").read_text())
    assert (state["best_step"], state["evals_since_best"]) == (3, 1)

    monkeypatch.setattr(train_module, "optimizer_step", original)
    calls = scripted_eval(monkeypatch, start=4)  # four evaluations happened before the interruption
    assert main(["train", str(config)]) == 0
    assert calls == [4, 5]  # steps 5 and 6, then early stopping, as in the uninterrupted run
    for key in ("best", "last_step", "stopped_early", "final_weights"):
        assert manifest(resumed)[key] == manifest(straight)[key]
    a, b = adapter_of_final(straight), adapter_of_final(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_resolves_from_the_data_and_is_written_down(tiny_config, tmp_path, capsys):
    rows = [{"instruction": f"Repeat the number {i}.", "output": str(i)} for i in range(240)]
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    run = tmp_path / "run"
    config = tiny_config(output_dir=str(run), data={"train_file": str(data)},
                         train={"learning_rate": "auto", "gradient_accumulation_steps": "auto", "max_steps": 3},
                         eval={"generate": True, "baseline": False, "max_samples": 4, "max_new_tokens": 4})
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    resolved = manifest(run)["resolved"]
    assert resolved["data.val_size"]["value"] == 20 and "held out" in resolved["data.val_size"]["why"]
    assert resolved["train.learning_rate"]["value"] == 1e-3
    assert resolved["train.gradient_accumulation_steps"]["value"] == 2  # batch 4 -> global batch 8
    assert resolved["train.num_train_epochs"]["value"] == 3
    assert resolved["train.eval_steps"]["value"] >= 1
    assert resolved["train.best_metric"]["value"] == "eval_exact_match"  # one-number answers
    evals = [m for m in read_metrics(run) if "eval_loss" in m]
    assert evals and all(0 <= m["eval_exact_match"] <= m["eval_accuracy"] + 1e-9 <= 1 + 1e-9 for m in evals)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 1e-3 and saved["data"]["val_size"] == 20
    assert json.loads((run / "eval/eval.json").read_text())["tuned"]["n"] == 4  # scored on the automatic split
    assert "auto (resolved at start" in out and "  data.val_size = 20: 20 of 240 rows held out" in out
    assert "  train.learning_rate = 0.001: LoRA" in out
    assert main(["report", str(run)]) == 0
    report = (run / "report/report.md").read_text()
    assert "## Hyperparameters" in report and "| data.val_size | 20 | auto: 20 of 240 rows held out" in report
    assert "| train.max_steps | 3 | config (or its default) |" in report
    # The same command again finds the completed run: the saved numbers and the requested autos agree.
    assert main(["train", str(config)]) == 2
    assert "already holds this run, completed" in capsys.readouterr().err


def test_eval_steps_without_any_eval_data_is_refused_at_start(tiny_config, tmp_path, capsys):
    config = tiny_config(output_dir=str(tmp_path / "run"), train={"eval_steps": 2})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.eval_steps needs eval data" in err and "data.val_size" in err


def test_auto_learning_rate_of_a_model_of_unknown_size_says_which_key_to_set(tiny_config, tmp_path, capsys,
                                                                            monkeypatch):
    def unknown(cfg):
        raise ValueError("no config.json")

    monkeypatch.setattr("instructkit.estimate.model_shape", unknown)
    config = tiny_config(output_dir=str(tmp_path / "run"), method="full", train={"learning_rate": "auto"})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: auto cannot be resolved" in err and "set train.learning_rate" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
