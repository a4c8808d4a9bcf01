"""The real CLI, in process, on the tiny random Llama: LoRA and full runs, run directory, final/ loading."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructkit.cli import main
from instructkit.metrics import read_metrics


def run_dir_of(config: Path) -> Path:
    import yaml

    return Path(yaml.safe_load(config.read_text())["output_dir"])


def test_lora_run_is_complete_and_loads_in_plain_peft(tiny_config, tiny_model_dir):
    config = tiny_config(train={"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1,
                                "report_to": ["tensorboard"]}, data={"val_size": 2})
    assert main(["train", str(config)]) == 0
    run = run_dir_of(config)
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "final/adapter_model.safetensors",
                 "final/adapter_config.json", "final/tokenizer.json", "final/chat_template.jinja",
                 "final/generation_config.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert (run / "checkpoints/step-000002/COMPLETE").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["end_time"]
    assert set(manifest["versions"]) >= {"python", "torch", "transformers", "peft", "accelerate"}
    assert len(manifest["data_files"]) == 1 and len(next(iter(manifest["data_files"].values()))) == 64
    assert manifest["parameters"]["trainable"] < manifest["parameters"]["total"]
    metrics = read_metrics(run)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any("eval_loss" in m for m in metrics)

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = AutoPeftModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned_state = tuned.state_dict()
    lora_b = [k for k in tuned_state if "lora_B" in k]
    assert lora_b and all(tuned_state[k].abs().sum() > 0 for k in lora_b)  # trained (initialised to zero)
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in tuned_state.items() if "lora_" not in k}
    for key, value in base.state_dict().items():
        assert torch.equal(frozen[key], value), key  # the base weights did not move
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert "### Response:" in tokenizer.chat_template  # the template used in training travels with it


def test_full_run_changes_weights_and_loads_in_plain_transformers(tiny_config, tiny_model_dir):
    config = tiny_config(method="full", train={"max_steps": 3, "learning_rate": 1e-3})
    assert main(["train", str(config)]) == 0
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(run_dir_of(config) / "final")
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    changed = [k for k, v in tuned.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert len(changed) > len(base) // 2


def test_loss_falls_on_a_repeated_batch(tiny_config):
    # 8 rows, batch 8: every step sees the same batch.
    config = tiny_config(train={"per_device_train_batch_size": 8, "max_steps": 12, "learning_rate": 5e-3,
                                "warmup_ratio": 0.0, "lr_scheduler_type": "constant"}, method="full")
    assert main(["train", str(config)]) == 0
    losses = [m["loss"] for m in read_metrics(run_dir_of(config)) if "loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses


def test_accumulated_loss_is_per_token_mean_of_the_step(tiny_config):
    """Batch 8 x accumulation 1 and batch 2 x accumulation 4 see the same tokens in the first step
    (the same shuffled order) and must report the same loss; so must the same batch padded."""
    root = tiny_config().parent
    results, batches = [], []
    for bs, acc, free, name in ((8, 1, "auto", "a"), (2, 4, "auto", "b"), (8, 1, False, "c")):
        cfg = tiny_config(train={"per_device_train_batch_size": bs, "gradient_accumulation_steps": acc,
                                 "max_steps": 1}, data={"padding_free": free}, output_dir=str(root / name))
        assert main(["train", str(cfg)]) == 0
        results.append(read_metrics(root / name)[0]["loss"])
        batches.append(json.loads((root / name / "manifest.json").read_text())["batches"])
    assert results[0] == pytest.approx(results[1], rel=1e-4)
    assert results[0] == pytest.approx(results[2], rel=1e-4)
    assert batches == ["padding-free", "padding-free", "padded"]  # auto: the CPU attention path attends per example


def test_generate_from_run_prompt_and_file(tiny_config, tmp_path, capsys):
    # q/v only: with every linear layer adapted, 4 steps at 1e-2 teach the tiny model to stop at once,
    # and this test needs some generated text to compare.
    config = tiny_config(lora={"target_modules": ["q_proj", "v_proj"]})
    assert main(["train", str(config)]) == 0
    run = run_dir_of(config)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Say yes.", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""  # random weights: some text, never an error
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "Add one.", "input": "2", "id": 1}\n{"prompt": "Hi", "id": 2}\n')
    out = tmp_path / "o.jsonl"
    assert main(["generate", str(run), "--file", str(prompts), "--output", str(out), "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and all(isinstance(r["output"], str) for r in rows)
    assert rows[0]["instruction"] == "Add one."


def test_inference_prompt_tokens_are_the_training_prompt_tokens(tiny_config):
    config = tiny_config(data={"template": "chatml"})
    assert main(["train", str(config)]) == 0
    from instructkit.config import load_config
    from instructkit.data.formats import Message
    from instructkit.data.pipeline import build_datasets
    from instructkit.data.tokenize import IGNORE
    from instructkit.generate import load_for_inference, prompt_example
    from instructkit.models import load_tokenizer

    cfg = load_config(config)
    example = build_datasets(cfg.data, load_tokenizer(cfg.model.name_or_path), cfg.seed).train[2]  # "Repeat" cat
    loaded = load_for_inference(str(run_dir_of(config)))
    assert loaded.template.name == "chatml"
    prompt = prompt_example(loaded, (Message("user", "Repeat the word.", "cat"),)).input_ids
    first_supervised = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    assert example.input_ids[:first_supervised] == prompt


def test_chat_loop_keeps_history(tiny_config):
    config = tiny_config(data={"template": "chatml"})
    assert main(["train", str(config)]) == 0
    from instructkit.generate import chat, load_for_inference

    loaded = load_for_inference(str(run_dir_of(config)))
    inputs, outputs, seen = iter(["hello", "again", "/exit"]), [], []
    original = loaded.model.generate

    def spy(**kwargs):
        seen.append(loaded.tokenizer.decode(kwargs["input_ids"][0]))
        return original(**kwargs)

    loaded.model.generate = spy
    chat(loaded, lambda _: next(inputs), outputs.append, max_new_tokens=2)
    assert len([o for o in outputs if o.startswith("model>")]) == 2
    assert "hello" in seen[1] and "again" in seen[1]  # second turn sees the first


def test_eval_with_baseline_writes_files_and_uses_identical_prompts(tiny_config, tmp_path, capsys, monkeypatch):
    config = tiny_config()
    assert main(["train", str(config)]) == 0
    run = run_dir_of(config)
    data = tmp_path / "test.jsonl"
    data.write_text('{"instruction": "Say yes.", "output": "yes", "task": "a"}\n'
                    '{"instruction": "Say no.", "output": "no", "task": "b"}\n')
    import instructkit.evaluate as ev

    seen, real_generate = [], ev.generate

    def spy(loaded, prompts, **kwargs):
        from instructkit.generate import prompt_example

        seen.append([prompt_example(loaded, p).input_ids for p in prompts])
        return real_generate(loaded, prompts, **kwargs)

    monkeypatch.setattr(ev, "generate", spy)
    assert main(["eval", str(run), "--data", str(data), "--baseline", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "| exact_match |" in out and "| rouge_l |" in out and "| perplexity |" in out
    assert len(seen) == 2 and seen[0] == seen[1]  # base and tuned saw the same prompt tokens
    results = json.loads((run / "eval/eval.json").read_text())
    for side in ("tuned", "base"):
        assert set(results[side]) >= {"loss", "perplexity", "exact_match", "rouge_l", "per_task", "n"}
        assert set(results[side]["per_task"]) == {"a", "b"}
    assert results["difference"]["loss"] == pytest.approx(results["tuned"]["loss"] - results["base"]["loss"])
    predictions = [json.loads(x) for x in (run / "eval/predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and all({"prompt", "reference", "base", "tuned"} <= set(p) for p in predictions)


def test_eval_generate_after_training_and_report(tiny_config, capsys):
    import base64
    import io
    import re

    config = tiny_config(data={"val_size": 2}, eval={"generate": True, "max_new_tokens": 3})
    assert main(["train", str(config)]) == 0
    assert "| exact_match |" in capsys.readouterr().out
    run = run_dir_of(config)
    assert json.loads((run / "eval/eval.json").read_text())["tuned"]["n"] == 2
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (run / "report/report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', page)
    assert [alt for alt, _ in images] == ["Loss", "Throughput and MFU"]
    import matplotlib.image

    for _, data in images:
        assert matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png").shape[2] in (3, 4)
    assert "<h2>Before and after</h2>" in page and "exact_match" in page and "<h2>Sample generations</h2>" in page
    markdown = (run / "report/report.md").read_text()
    assert "![Loss](loss.png)" in markdown and (run / "report/loss.png").is_file() and "| metric | base |" in markdown


def test_report_without_eval_says_how(tiny_config, capsys):
    config = tiny_config()
    assert main(["train", str(config)]) == 0
    assert main(["report", str(run_dir_of(config))]) == 0
    assert "No evaluation yet" in (run_dir_of(config) / "report/report.md").read_text()
    assert main(["report", str(config.parent)]) == 2
