"""Faults: NaN loss, a full disk, an unwritable directory, unsafe weights, and malformed input that
must leave an existing run untouched."""

import errno
import json
import os
import shutil

import pytest

from instructkit.checkpoint import verify_checkpoint
from instructkit.cli import main
from tests.conftest import tree_digest


def checkpointing(tiny_config, **train):
    return tiny_config(train={"max_steps": 5, "save_strategy": "steps", "save_steps": 1, "save_total_limit": None,
                              **train})


def test_nan_loss_stops_with_step_and_hint_and_saves_nothing_after(tiny_config, monkeypatch, capsys):
    import instructkit.train as tr

    real, calls = tr.loss_sum, [0]

    def poisoned(model, batch):
        calls[0] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls[0] == 3 else loss

    monkeypatch.setattr(tr, "loss_sum", poisoned)
    config = checkpointing(tiny_config)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "the loss is nan at step 3" in err and "lower train.learning_rate" in err
    run = config.parent / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert all(verify_checkpoint(p) is None for p in (run / "checkpoints").iterdir())
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"


def test_full_disk_keeps_earlier_checkpoints(tiny_config, monkeypatch, capsys):
    import safetensors.torch as st

    real, writes = st.save_file, [0]

    def filling(tensors, filename, *args, **kwargs):
        if os.path.basename(filename) == "optimizer.safetensors":
            writes[0] += 1
            if writes[0] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(st, "save_file", filling)
    config = checkpointing(tiny_config)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "cannot write the checkpoint of step 3" in err and "the disk is full" in err
    assert "earlier checkpoints are intact" in err
    checkpoints = config.parent / "run/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002"]  # no .tmp left
    assert all(verify_checkpoint(p) is None for p in checkpoints.iterdir())


def test_unwritable_output_directory(tiny_config, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory must go: unwritable even for root
    assert main(["train", str(tiny_config(output_dir=str(blocker / "run")))]) == 2
    assert f"output_dir: output_dir {blocker / 'run'} cannot be written ({blocker} is not a directory)" \
        in capsys.readouterr().err


def test_pickled_weights_need_allow_pickle(tiny_config, tiny_model_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-model"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((tiny_model_dir / name).read_bytes())
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), pickled / "pytorch_model.bin")
    config = tiny_config(model={"name_or_path": str(pickled)})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "only pickled weights (pytorch_model.bin)" in err and "model.allow_pickle: true" in err
    assert main(["train", str(tiny_config(model={"name_or_path": str(pickled), "allow_pickle": True}))]) == 0


@pytest.mark.parametrize("command", [["validate"], ["train"], ["data", "inspect"], ["data", "prepare"], ["estimate"]])
def test_remote_code_from_the_hub_needs_a_pinned_revision(tiny_config, capsys, command):
    config = tiny_config(model={"name_or_path": "someone/model", "trust_remote_code": True})
    assert main([*command, str(config)]) == 2
    assert "pin model.revision to a 40-hex commit hash" in capsys.readouterr().err


def test_data_inspect_loads_the_pinned_revision(tiny_config, monkeypatch):
    from instructkit import models

    seen = {}
    real = models.load_tokenizer

    def spy(path, trust_remote_code=False, revision=None):
        seen["revision"] = revision
        return real(path, trust_remote_code)

    monkeypatch.setattr(models, "load_tokenizer", spy)
    assert main(["data", "inspect", str(tiny_config(model={"revision": "a" * 40}))]) == 0
    assert seen["revision"] == "a" * 40


MALFORMED = {
    "yaml syntax": ("config", "model: [unclosed\n", "not valid YAML"),
    "unknown key": ("override", "train.learnig_rate=1", "train.learnig_rate: unknown key"),
    "wrong type": ("override", "train.max_steps=many", "train.max_steps: Input should be a valid integer"),
    "bad choice": ("override", "method=qlora", "method: Input should be 'lora' or 'full'"),
    "missing data": ("override", "data.train_file=nowhere.jsonl", "data file not found: nowhere.jsonl"),
    "truncated json": ("data", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "out', "invalid JSON"),
    "empty output": ("data", '{"instruction": "a", "output": ""}\n', "field 'output' is empty"),
    "wrong role": ("data", '{"messages": [{"role": "bot", "content": "x"}]}\n', "messages[0].role is 'bot'"),
    "not utf-8": ("data", b'{"instruction": "\xff", "output": "b"}\n', "not UTF-8"),
    "missing model": ("override", "model.name_or_path=./no/model", "model.name_or_path"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_exits_2_and_leaves_the_run_untouched(tiny_config, tmp_path, capsys, case, finished_tiny_run):
    config = tiny_config()
    run = config.parent / "run"
    shutil.copytree(finished_tiny_run, run)  # a finished run of this config, trained once for all cases
    before = tree_digest(run)
    kind, payload, message = MALFORMED[case]
    args = ["train", str(config), "--overwrite"]  # even --overwrite must not touch the run on bad input
    if kind == "config":
        bad = tmp_path / "bad.yaml"
        bad.write_text(payload)
        args[1] = str(bad)
    elif kind == "override":
        args.append(payload)
    else:
        data = tmp_path / "bad.jsonl"
        data.write_bytes(payload if isinstance(payload, bytes) else payload.encode())
        args.append(f"data.train_file={data}")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert tree_digest(run) == before


def test_inference_refuses_pickled_weights_unless_allowed(tiny_model_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-model"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((tiny_model_dir / name).read_bytes())
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), pickled / "pytorch_model.bin")
    args = ["generate", str(pickled), "--prompt", "Hi", "--max-new-tokens", "2"]
    assert main(args) == 2
    assert "only pickled weights" in capsys.readouterr().err
    assert main(args + ["--allow-pickle"]) == 0
