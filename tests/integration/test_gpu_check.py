"""bench/gpu_check.py --smoke: the GPU check's dry run on the CPU lists every part, runs those a CPU can run and
skips the CUDA-only ones with the reason, so CI exercises the script the GPU machine runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PARTS = ["packages", "env", "tests-gpu", "setup", "lora", "full", "seed-recipe", "trl-sft", "recipe-fp16",
         "lora-liger", "full-liger", "qlora", "lora-gc", "quickstart", "merge", "export-gguf", "serve", "eval"]
CUDA_ONLY = {"tests-gpu", "recipe-fp16", "lora-liger", "full-liger", "qlora"}
TRAINING = {"lora", "full", "seed-recipe", "trl-sft", "lora-gc"}


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_or_says_why_not(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == PARTS and report["mode"] == "smoke"
    for name, part in parts.items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "skipped":
            assert part["reason"], name
    assert {n for n, p in parts.items() if p["status"] == "skipped"} == CUDA_ONLY
    assert all(parts[n]["reason"].startswith("needs CUDA") for n in CUDA_ONLY)
    for name in TRAINING:
        figures = parts[name]["figures"]
        assert figures["tokens_per_s"] > 0 and figures["mfu"] > 0 and figures["timed_steps"] >= 1, name
    assert parts["serve"]["figures"]["stopped_exit"] == 0 and parts["serve"]["figures"]["reply"]
    assert (tmp_path / "work/model.gguf").stat().st_size > 0
    compared = [row["part"] for row in report["side_by_side"]]
    assert compared == ["seed-recipe", "trl-sft", "lora", "lora-gc", "full"]
    assert all("vs_seed-recipe" in row for row in report["side_by_side"] if row["part"] != "seed-recipe")
    assert [t["target"] for t in report["targets"]][0] == "full fine-tuning MFU >= 45%"
    table = out.with_suffix(".md").read_text()
    assert "| tests-gpu | skipped |" in table and "| run | precision | tokens/s |" in table
