"""The benchmark scripts run (their numbers come from `make bench` and bench/gpu.sh, never from tests)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gpu_benchmark_smoke_runs_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--smoke"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("JSON "))[5:])
    assert [r["method"] for r in results] == ["full", "lora"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in results)


def test_training_benchmark_runs_a_variant_on_given_data(tmp_path):
    rows = [{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in ("apple", "pear", "plum", "fig")]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(ROOT / "bench/bench.py"), "--one", "instructkit-padded:lora", "--steps",
                          "2", "--batch", "2", "--data", str(data), "--max-length", "64"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["variant"] == "instructkit-padded" and result["steps"] == 2 and result["tokens_per_s"] > 0


def test_cpu_ceiling_benchmark_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench/cpu_ceiling.py"), "--dtype", "float32", "--rows", "8",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "chain of model-shaped matmuls" in out.stdout and "TFLOP/s" in out.stdout


def test_quality_suite_is_deterministic_and_keeps_entities_apart(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from quality_tasks import TASKS, build

    counts = build(tmp_path / "a")
    build(tmp_path / "b")
    assert counts == {"train": 504, "test": 200, "tasks": len(TASKS)}
    for name in ("train.jsonl", "test.jsonl"):  # the same rows on every build
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = {split: [json.loads(x) for x in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "test")}
    assert all(r["instruction"] and r["input"] and r["output"] and r["task"] in TASKS for r in rows["train"])
    for task in TASKS:  # no held-out prompt was trained on
        seen = {(r["instruction"], r["input"]) for r in rows["train"] if r["task"] == task}
        assert not [r for r in rows["test"] if r["task"] == task and (r["instruction"], r["input"]) in seen]


def test_quality_benchmark_checks_the_issue_targets_it_has_both_sides_of():
    sys.path.insert(0, str(ROOT / "bench"))
    from quality import targets

    rows = {"trl": {"exact_match": 0.20, "seconds": 242}, "instructkit": {"exact_match": 0.355, "seconds": 145},
            "sweep": {"exact_match": 0.385, "seconds": 472}}
    assert [line.rsplit(": ", 1)[1] for line in targets(rows)] == ["met", "met"]
    tie = {**rows, "sweep": {"exact_match": 0.355, "seconds": 472}}  # a tie does not beat the default
    slow = {**rows, "instructkit": {"exact_match": 0.355, "seconds": 250}}  # slower than TRL
    assert targets(tie)[1].endswith("NOT met") and targets(slow)[0].endswith("NOT met")
    assert targets({"instructkit": rows["instructkit"], "sweep": rows["sweep"]}) == [targets(rows)[1]]
