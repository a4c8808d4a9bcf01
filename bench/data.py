"""Data at scale, side by side in one invocation: `instructkit data prepare` against the anchor (Hugging Face
`datasets`: `load_dataset("json")` + batched `map` tokenizing the same rendered Alpaca text with the same
tokenizer and num_proc), on generated Alpaca-style JSONL (bench/make_alpaca_rows.py).

    python bench/data.py --rows 100000,1000000 --num-proc 2 --out bench/results-data

Per size: rows/s and peak RSS of each process tree (sampled every 0.1 s with psutil), the cache hit (a
second `prepare`), and on the largest size the start of `instructkit train` on the cached set (one optimizer
step; the same command on 1,000 rows subtracted, so model loading and the step itself cancel) and best-fit
packing of its example lengths. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

ANCHOR = r"""
import sys, json
from datasets import load_dataset
from transformers import AutoTokenizer
path, model, num_proc, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(model)
PRE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
       "request.\n\n")
PRE_IN = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n")
def text(i, x, o):
    if x:
        return f"{PRE_IN}### Instruction:\n{i}\n\n### Input:\n{x}\n\n### Response:\n{o}{tok.eos_token}"
    return f"{PRE}### Instruction:\n{i}\n\n### Response:\n{o}{tok.eos_token}"
def tokenize(batch):
    texts = [text(i, x, o) for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])]
    return tok(texts, add_special_tokens=False)
if len(sys.argv) > 5:  # check: the text tokenized here is what instructkit renders
    from instructkit.data.formats import to_messages
    from instructkit.data.templates import render, resolve_template
    tpl = resolve_template("alpaca", tok)
    for line in list(open(path))[:300]:
        r = json.loads(line)
        assert render(tpl, tok, to_messages(r, "alpaca"), False) == text(r["instruction"], r["input"], r["output"])
    print("the anchor tokenizes the text instructkit renders"); sys.exit()
ds = load_dataset("json", data_files=path, split="train", cache_dir=cache)
ds = ds.map(tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=ds.column_names)
print(json.dumps({"rows": len(ds)}))
"""

def measure(cmd: list[str], env: dict) -> dict:
    """Wall time, exit code and peak RSS of the command's whole process tree."""
    start = time.monotonic()
    # Output to a file, not a pipe read at the end: a child that prints more than the pipe holds (the anchor's
    # progress bars over a million rows) would block on the write and never finish.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    log.seek(0)
    out = log.read()
    if proc.returncode:
        print(out[-3000:])
    return {"seconds": round(time.monotonic() - start, 2), "peak_rss_mb": round(peak / 2**20), "rc": proc.returncode,
            "tail": out.strip().splitlines()[-2:] if out.strip() else []}


def config(path: Path, data: Path, num_proc: int, out: Path) -> Path:
    cfg = {"run_name": "bench-data", "output_dir": str(out), "seed": 0,
           "model": {"name_or_path": "smollm2-135m-instruct", "precision": "fp32"}, "method": "lora",
           "data": {"train_file": str(data), "template": "alpaca", "max_length": 512, "val_size": 0,
                    "num_proc": num_proc},
           "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 1,
                     "save_strategy": "no", "report_to": [], "logging_steps": 1}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--work", default="/tmp/instructkit-bench-data")
    parser.add_argument("--out", default="bench/results-data")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INSTRUCTKIT_HOME": str(work / "home")}
    sys.path.insert(0, str(ROOT / "src"))
    from instructkit.models import resolve_model

    model = resolve_model("smollm2-135m-instruct")
    ik = [str(Path(PY).with_name("instructkit"))]
    results: dict = {"num_proc": args.num_proc, "sizes": {}}
    sizes = [int(n) for n in args.rows.split(",")]
    for n in [1000] + sizes:
        data = work / f"alpaca-{n}.jsonl"
        if not data.is_file():
            subprocess.run([PY, str(ROOT / "bench/make_alpaca_rows.py"), "--rows", str(n), "--out", str(data)],
                           check=True)
    print(subprocess.run([PY, "-c", ANCHOR, str(work / "alpaca-1000.jsonl"), model, "1", "-", "check"], env=env,
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip())
    for n in sizes:
        data, home = work / f"alpaca-{n}.jsonl", work / "home" / "data-cache"
        subprocess.run(["rm", "-rf", str(home)])
        cfg = config(work / f"cfg-{n}.yaml", data, args.num_proc, work / f"run-{n}")
        row = {"file_mb": round(data.stat().st_size / 2**20)}
        row["ours"] = measure(ik + ["data", "prepare", str(cfg)], env)
        row["ours_hit"] = measure(ik + ["data", "prepare", str(cfg)], env)
        row["anchor"] = measure([PY, "-c", ANCHOR, str(data), model, str(args.num_proc), str(work / f"hf-{n}")], env)
        subprocess.run(["rm", "-rf", str(work / f"hf-{n}")])
        for key in ("ours", "anchor"):
            row[key]["rows_per_s"] = round(n / row[key]["seconds"])
        print(n, json.dumps(row), flush=True)
        results["sizes"][n] = row
    big = max(sizes)
    small_cfg = config(work / "cfg-1000.yaml", work / "alpaca-1000.jsonl", args.num_proc, work / "run-1000")
    measure(ik + ["data", "prepare", str(small_cfg)], env)
    for n, cfg in ((1000, small_cfg), (big, work / f"cfg-{big}.yaml")):
        results[f"train_{n}"] = measure(ik + ["train", str(cfg), "--overwrite"], env)
    results["first_step_extra_s"] = round(results[f"train_{big}"]["seconds"] - results["train_1000"]["seconds"], 1)
    pack_code = ("import time,sys; sys.path.insert(0,'src'); from instructkit.data.pipeline import build_datasets; "
                 "from instructkit.config import load_config; from instructkit.models import load_config_tokenizer;"
                 "from instructkit.data.packing import pack; from instructkit.data.store import lengths_of;"
                 f"cfg=load_config('{work}/cfg-{big}.yaml', []); _, tok = load_config_tokenizer(cfg.model);"
                 "t=time.time(); d=build_datasets(cfg.data, tok, 0); hit=time.time()-t; L=lengths_of(d.train);"
                 "t=time.time(); b=pack(L, 512); print(len(L), len(b), round(hit,2), round(time.time()-t,2))")
    out = subprocess.run([PY, "-c", pack_code], env=env, cwd=ROOT, capture_output=True, text=True).stdout.split()
    results["packing"] = {"examples": int(out[0]), "rows": int(out[1]), "open_s": float(out[2]),
                          "pack_s": float(out[3])}
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    lines = ["| rows | file | ours rows/s | anchor rows/s | ratio | ours peak RSS | anchor peak RSS | cache hit |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in results["sizes"].items():
        lines.append(f"| {n:,} | {r['file_mb']} MB | {r['ours']['rows_per_s']:,} | {r['anchor']['rows_per_s']:,} | "
                     f"{r['ours']['rows_per_s'] / r['anchor']['rows_per_s']:.2f}x | {r['ours']['peak_rss_mb']:,} MB | "
                     f"{r['anchor']['peak_rss_mb']:,} MB | {r['ours_hit']['seconds']} s |")
    t_big, t_small = results[f"train_{big}"], results["train_1000"]
    lines.append(f"\n`train` to one optimizer step: {t_big['seconds']} s on {big:,} rows (peak RSS "
                 f"{t_big['peak_rss_mb']:,} MB), {t_small['seconds']} s on 1,000 rows ({t_small['peak_rss_mb']:,} MB):"
                 f" {results['first_step_extra_s']} s more. Packing {results['packing']['examples']:,} examples: "
                 f"{results['packing']['pack_s']} s ({results['packing']['rows']:,} rows).")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
