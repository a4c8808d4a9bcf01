"""Data features through the real CLI on the tiny model."""

import json

import pytest

from instructkit.cli import main
from instructkit.data.tokenize import IGNORE
from instructkit.metrics import read_metrics
from tests.conftest import ROWS, write_jsonl


def test_packed_and_padded_runs_report_the_same_loss(tiny_config, tmp_path):
    losses = {}
    for packing in (False, True):
        # one optimizer step over all 8 rows: batch 8 padded, or up to 8 packed rows (all examples)
        cfg = tiny_config(data={"packing": packing}, output_dir=str(tmp_path / f"run-{packing}"),
                          train={"per_device_train_batch_size": 8, "max_steps": 1})
        assert main(["train", str(cfg)]) == 0
        losses[packing] = read_metrics(tmp_path / f"run-{packing}")[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_packing_run_trains_several_steps(tiny_config, capsys):
    cfg = tiny_config(data={"packing": True, "max_length": 400}, train={"per_device_train_batch_size": 1, "max_steps": 3})
    assert main(["train", str(cfg)]) == 0
    assert "packing: 8 examples in" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(cfg.parent / "run")] == [1, 2, 3]


def test_skipped_bad_rows_are_reported_in_the_run_directory(tiny_config, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mixed.jsonl", ROWS + [{"instruction": "no output"}])
    cfg = tiny_config(data={"train_file": str(data), "on_bad_row": "skip", "max_bad_fraction": 0.5})
    assert main(["train", str(cfg)]) == 0
    assert "1 bad rows skipped" in capsys.readouterr().out
    report = json.loads((cfg.parent / "run/data_report.json").read_text())
    assert report["train"]["counts"] == {"missing field": 1}
    assert report["train"]["examples"][0]["where"] == f"{data}:9"
    assert main(["train", str(tiny_config(data={"train_file": str(data)}))]) == 2  # default: error


def test_data_inspect_marks_supervised_tokens(tiny_config, capsys):
    cfg = tiny_config()
    assert main(["data", "inspect", str(cfg), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "### Response:\n[[yes</s>]]" in out  # not a terminal: brackets
    assert "packing efficiency" in out and "token lengths: p50" in out and "alpaca: 8" in out
    assert main(["data", "inspect", str(cfg), "--n", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    example = report["examples"][0]
    assert len(example["input_ids"]) == len(example["labels"])
    supervised = [(t, label) for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert len(supervised) == 4 and all(t == label for t, label in supervised)  # y, e, s, </s>: labels unshifted
    assert report["rows_per_format"] == {"alpaca": 8} and report["cache"] == "hit"


def test_validate_reports_formats_and_bad_rows(tiny_config, tmp_path, capsys):
    data = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}])
    assert main(["validate", str(tiny_config(data={"train_file": str(data)}))]) == 0
    assert f"1 train rows ({data}: messages)" in capsys.readouterr().out


def test_data_prepare_fills_the_cache_that_train_then_hits(tiny_config, capsys):
    cfg = tiny_config(data={"max_length": 300})
    assert main(["data", "prepare", str(cfg)]) == 0
    assert "tokenized data cache: miss" in capsys.readouterr().out
    assert main(["train", str(cfg)]) == 0
    assert "tokenized data cache: hit" in capsys.readouterr().out
    assert main(["data", "prepare", str(cfg), "data.cache=false"]) == 2


def test_concurrent_processes_tokenize_once(tiny_config, tmp_path):
    """Two processes building the same data at once: one tokenizes under the cache lock, the other
    waits on the lock file (not on a collective) and reads the cache."""
    import subprocess
    import sys

    cfg = tiny_config(data={"max_length": 310})
    procs = [subprocess.Popen([sys.executable, "-m", "instructkit", "data", "prepare", str(cfg)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted("cache: miss" in o for o in outs) == [False, True], outs


def test_a_broken_template_file_stops_data_inspect_naming_the_file(tiny_config, tmp_path, capsys):
    """Checked when the template is resolved, before any row is tokenized: exit 2, the file and the turn."""
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")  # no end-of-turn token
    for command in (["data", "inspect"], ["validate"]):
        assert main([*command, str(tiny_config()), f"data.template={bad}"]) == 2
        err = capsys.readouterr().err
        assert f"{bad}: turn 3 (assistant)" in err and "could not learn to stop" in err and "Traceback" not in err
