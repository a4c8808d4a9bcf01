"""Preference tuning end to end on the tiny model: SFT then DPO continuing its adapter with the template it
trained with; ORPO and SimPO with full tuning; exact resume after SIGKILL; two processes like one; bad input
refused before any model loads; eval on pairs."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from instructkit.cli import main
from instructkit.metrics import read_metrics
from tests.conftest import ROWS, write_jsonl
from tests.integration.test_distributed import assert_same_training, launch
from tests.integration.test_resume import finish, kill_after_steps, start

WRONG = ["maybe", "42", "purple", "banana", "never", "x"]


def pair_rows(repeat: int = 3) -> list[dict]:
    """Each demonstration's answer as chosen against a wrong one; several wrong answers per prompt."""
    rows = []
    for k in range(repeat):
        for i, row in enumerate(ROWS):
            pair = {"prompt": row["instruction"], "chosen": row["output"], "rejected": f"{WRONG[(i + k) % 6]} {k}"}
            if row.get("input"):
                pair["input"] = row["input"]
            rows.append(pair)
    return rows


def pref_config(tmp_path: Path, model: Path | str, name: str, **sections) -> Path:
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = {"run_name": name, "output_dir": str(tmp_path / name), "seed": 1,
           "model": {"name_or_path": str(model), "precision": "fp32"}, "method": "lora", "objective": "dpo",
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "data": {"train_file": str(data), "max_length": 320, "val_size": 0},
           "train": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 6,
                     "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "report_to": []},
           "eval": {}}
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_then_dpo_continues_the_adapter_with_its_template(tiny_lora_run, tmp_path, capsys):
    config = pref_config(tmp_path, tiny_lora_run, "dpo", data={"val_size": 4}, train={"eval_steps": 3})
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    sft_template = json.loads((tiny_lora_run / "manifest.json").read_text())["data"]["template"]
    assert f"template: {sft_template}, inherited from the run {tiny_lora_run}" in out
    assert "reference log-probs: computed for 24 pairs (the starting weights)" in out
    run = tmp_path / "dpo"
    steps = [m for m in read_metrics(run) if "loss" in m]
    assert len(steps) == 6 and {"rewards_chosen", "rewards_rejected", "reward_margin", "pref_accuracy"} <= set(steps[0])
    # The policy starts as its reference: no reward yet, and the loss is log 2 plus the NLL term (auto: 1.0).
    assert steps[0]["rewards_chosen"] == pytest.approx(0, abs=1e-3) and steps[0]["reward_margin"] == pytest.approx(
        0, abs=1e-3) and steps[0]["loss"] > 0.693
    evals = [m for m in read_metrics(run) if "eval_loss" in m]
    assert len(evals) == 2 and "eval_pref_accuracy" in evals[-1] and "eval_ppl" not in evals[-1]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["objective"] == "dpo" and manifest["resolved"]["preference.beta"]["value"] == 0.1
    assert manifest["resolved"]["preference.nll_weight"]["value"] == 1.0
    adapter = json.loads((run / "final/adapter_config.json").read_text())
    sft_adapter = json.loads((tiny_lora_run / "final/adapter_config.json").read_text())
    # peft writes target_modules from a set: its order follows the process's string hashing, not the model
    assert adapter["r"] == sft_adapter["r"] and set(adapter["target_modules"]) == set(sft_adapter["target_modules"])
    assert (run / "final/tokenizer_config.json").is_file()

    again = pref_config(tmp_path, tiny_lora_run, "dpo2", data={"val_size": 4}, train={"eval_steps": 3})
    assert main(["train", str(again)]) == 0
    assert "reference log-probs: cache hit" in capsys.readouterr().out
    assert [m["loss"] for m in read_metrics(tmp_path / "dpo2") if "loss" in m] == [m["loss"] for m in steps]

    assert main(["eval", str(run), "--data", str(tmp_path / "pairs.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "| pref_accuracy |" in printed and "n = 24 pairs" in printed and "pairs.jsonl" in printed
    assert json.loads((run / "eval/eval.json").read_text())["kind"] == "preference"
    assert main(["report", str(run)]) == 0
    assert (run / "report/preference.png").is_file()
    assert "| pref_accuracy |" in (run / "report/report.md").read_text()


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_tune_every_weight(tiny_model_dir, tmp_path, capsys, objective):
    config = pref_config(tmp_path, tiny_model_dir, objective, objective=objective, method="full",
                         train={"learning_rate": 1e-3})
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "is not an instructkit run; " + objective + " renders the pairs with the 'alpaca' template: the builtin " \
        "fallback: the model's tokenizer carries no chat template" in out
    assert main(["validate", str(config)]) == 0
    assert "renders the pairs with the 'alpaca' template" in capsys.readouterr().out
    assert "reference log-probs" not in out  # no reference: nothing computed
    steps = [m for m in read_metrics(tmp_path / objective) if "loss" in m]
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"]
    assert (tmp_path / objective / "final/model.safetensors").is_file()


def _outcome(run: Path) -> tuple[str, list[float]]:
    weights = hashlib.sha256((run / "final/adapter_model.safetensors").read_bytes()).hexdigest()
    return weights, [m["loss"] for m in read_metrics(run) if "loss" in m]


def test_dpo_killed_and_resumed_is_bit_identical(tiny_model_dir, tmp_path):
    """SIGKILL mid-run, start again: the same adapter bit for bit and the same losses (dropout on: the RNG is
    restored; the reference log-probs come from the cache, equal to what the first start computed)."""
    train = {"save_strategy": "steps", "save_steps": 1, "save_total_limit": None}
    straight = pref_config(tmp_path, tiny_model_dir, "straight", lora={"dropout": 0.1}, train=train)
    code, out = finish(start(straight))
    assert code == 0, out
    killed = pref_config(tmp_path, tiny_model_dir, "killed", lora={"dropout": 0.1}, train=train)
    kill_after_steps(killed, tmp_path / "killed", 2)
    code, out = finish(start(killed))
    assert code == 0, out
    assert "resumed from" in out
    assert _outcome(tmp_path / "killed") == _outcome(tmp_path / "straight")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo launches are tested on Linux")
def test_dpo_on_two_processes_trains_like_one(tiny_model_dir, tmp_path):
    """DDP (gloo): 2 processes x 2 pairs train like 1 process x 2 pairs x accumulation 2."""
    one = pref_config(tmp_path, tiny_model_dir, "one", train={"gradient_accumulation_steps": 2, "max_steps": 4})
    code, out = launch(one, nproc=0)
    assert code == 0, out
    two = pref_config(tmp_path, tiny_model_dir, "two", train={"max_steps": 4})
    code, out = launch(two, "distributed=ddp")
    assert code == 0, out
    assert "x 2 process(es) = global batch 4 (ddp)" in out
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_objective_and_data_must_agree_before_any_model_loads(tiny_model_dir, tmp_path, capsys):
    sft_data = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    config = pref_config(tmp_path, tiny_model_dir, "bad", data={"train_file": str(sft_data)})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "objective: dpo needs preference pairs" in err and "data.train_file" in err
    assert main(["validate", str(config)]) == 2  # validate says it too, without a tokenizer's model loaded
    assert "objective: dpo needs preference pairs" in capsys.readouterr().err
    config = pref_config(tmp_path, tiny_model_dir, "bad2", objective="sft")
    assert main(["train", str(config)]) == 2
    assert "holds preference pairs (chosen/rejected) but objective is sft" in capsys.readouterr().err
    config = pref_config(tmp_path, tiny_model_dir, "bad3", data={"packing": True})
    assert main(["train", str(config)]) == 2
    assert "preference pairs are not packed" in capsys.readouterr().err
    config = pref_config(tmp_path, tiny_model_dir, "bad4", train={"best_metric": "eval_exact_match"})
    assert main(["train", str(config)]) == 2
    assert "use eval_loss, eval_pref_accuracy or auto" in capsys.readouterr().err
    config = pref_config(tmp_path, tiny_model_dir, "bad5", eval={"generate": True}, data={"val_size": 4})
    assert main(["train", str(config)]) == 2
    assert "eval.generate scores generations against references" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("bad", "bad2", "bad3", "bad4", "bad5"))


def test_a_merged_supervised_model_is_rendered_with_the_template_saved_in_it(tiny_lora_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", str(tiny_lora_run), "--out", str(merged)]) == 0
    config = pref_config(tmp_path, merged, "from-merged")
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    sft_template = json.loads((tiny_lora_run / "manifest.json").read_text())["data"]["template"]
    assert f"template {sft_template}" in out and "the chat template saved with the model's tokenizer" in out


def test_the_studio_data_preview_shows_both_answers_of_a_pair(tiny_model_dir, tmp_path):
    from instructkit.config import load_config
    from instructkit.studio.preview import safe_preview

    report = safe_preview(load_config(pref_config(tmp_path, tiny_model_dir, "preview")), n=1)
    assert "error" not in report, report.get("error")
    chosen, rejected = report["examples"]
    assert chosen["where"].endswith("(chosen)") and rejected["where"].endswith("(rejected)")
    supervised = ["".join(s["text"] for s in e["spans"] if s["supervised"]) for e in (chosen, rejected)]
    assert supervised == [f"{ROWS[0]['output']}</s>", f"{pair_rows()[0]['rejected']}</s>"]
    assert chosen["spans"][0] == rejected["spans"][0] and not chosen["spans"][0]["supervised"]  # one prompt
    assert sum(report["histogram"]["counts"]) == len(pair_rows())
