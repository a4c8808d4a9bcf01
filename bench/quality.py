"""Quality side by side: the model each system hands back, scored on held-out prompts of real tasks.

    python bench/quality.py                                  # untuned, TRL, instructkit, sweep
    python bench/quality.py --variants instructkit "instructkit:train.learning_rate=1e-3,lora.r=16"

On the development suite (bench/quality_tasks.py: eight task families from pycountry, babel and
unicodedata; 504 training rows, 200 held-out prompts), SmolLM2-135M-Instruct, in one invocation:

- untuned: the base model with its own chat template (scored as the baseline of the instructkit run);
- trl: TRL `SFTTrainer`, LoRA r8 on q_proj/v_proj (the article's adapter), learning rate 2e-4, batch 8,
  one epoch, prompt/completion rows in the model's chat template, everything else TRL's default;
- instructkit: a config naming only the model, the data and `method: lora`;
- sweep: `instructkit sweep` on that config with a fixed trial budget; its best trial is scored.

Every model is scored by the same code (`instructkit eval`: greedy decoding, exact match after
normalising case, whitespace and trailing punctuation). Training time is the wall time of the training
process, model loading included. Prints the table and, where both sides ran, issue 14's targets as met
or NOT met; writes bench/results-quality.{json,md}.
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

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
CLI = [sys.executable, "-m", "instructkit"]


def timed(cmd: list[str], log: Path) -> float:
    """Run a command with its output in `log`; its wall seconds. A failure stops the benchmark loudly."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def three_line_config(data: Path, out: Path, name: str) -> Path:
    """What a user writes first: the model, the data, the method. Nothing else."""
    path = out / f"{name}.yaml"
    path.write_text(f"model:\n  name_or_path: {MODEL}\ndata:\n  train_file: {data / 'train.jsonl'}\nmethod: lora\n"
                    f"output_dir: {out / name}\n")
    return path


def score(model_dir: Path, data: Path, out: Path, baseline: bool = False) -> dict:
    cmd = [*CLI, "eval", str(model_dir), "--data", str(data / "test.jsonl"), "--out", str(out), "--batch-size", "32",
           "--max-new-tokens", "24"]
    timed(cmd + (["--baseline"] if baseline else []), out.parent / f"{out.name}.log")
    return json.loads((out / "eval.json").read_text())


def run_instructkit(data: Path, work: Path, name: str, overrides: list[str], baseline: bool) -> dict:
    config = three_line_config(data, work, name)
    seconds = timed([*CLI, "train", str(config), *overrides, "--overwrite"], work / f"{name}-train.log")
    results = score(work / name, data, work / f"{name}-eval", baseline)
    manifest = json.loads((work / name / "manifest.json").read_text())
    return {"seconds": seconds, "results": results, "resolved": manifest.get("resolved", {})}


def run_sweep(data: Path, work: Path, trials: int, params: list[str]) -> dict:
    config = three_line_config(data, work, "sweep-base")
    sweep_dir = work / "sweep"
    cmd = [*CLI, "sweep", str(config), "--trials", str(trials), "--sweep-dir", str(sweep_dir)]
    seconds = timed(cmd + [arg for p in params for arg in ("--param", p)], work / "sweep.log")
    board = json.loads((sweep_dir / "leaderboard.json").read_text())
    best = Path(board["best"]["run_dir"])
    return {"seconds": seconds, "results": score(best, data, work / "sweep-eval"), "best": board["best"]}


def train_trl(data: Path, out: Path) -> None:
    """TRL's SFTTrainer with the article's adapter and the user's first settings; saves the merged model."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from instructkit.models import resolve_model

    path = resolve_model(MODEL)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    examples = [{"prompt": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}" if r.get("input")
                             else r["instruction"]}],
                 "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows]
    args = SFTConfig(output_dir=str(out / "trl-ckpt"), per_device_train_batch_size=8, num_train_epochs=1, use_cpu=True,
                     learning_rate=2e-4, save_strategy="no", report_to=[], seed=42, disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tok = AutoTokenizer.from_pretrained(path)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(examples), peft_config=lora)
    trainer.train()
    trainer.model.merge_and_unload().save_pretrained(out / "trl")
    tok.save_pretrained(out / "trl")


def run_trl(data: Path, work: Path) -> dict:
    seconds = timed([sys.executable, __file__, "--trl-worker", str(data), str(work)], work / "trl-train.log")
    return {"seconds": seconds, "results": score(work / "trl", data, work / "trl-eval")}


def table(rows: dict, tasks: list[str]) -> str:
    head = "| system | " + " | ".join(tasks) + " | overall exact match | training time |"
    lines = [head, "|" + " --- |" * (len(tasks) + 3)]
    for name, row in rows.items():
        per = row["per_task"]
        cells = [f"{100 * per[t]['exact_match']:.0f}%" for t in tasks]
        seconds = f"{row['seconds']:.0f} s" if row.get("seconds") else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{100 * row['exact_match']:.1f}%** | {seconds} |")
    return "\n".join(lines)


def targets(rows: dict) -> list[str]:
    """Issue 14's targets, where the rows hold both sides: the three-line config at least 10 exact-match
    points above TRL in no more wall time; the sweep above the three-line config within 4x its time."""
    out = []
    for name, other, wanted, above, ratio in (("instructkit", "trl", ">= 10", lambda g: g >= 10, 1.0),
                                              ("sweep", "instructkit", "> 0", lambda g: g > 0, 4.0)):
        a, b = rows.get(name), rows.get(other)
        if not (a and b and a.get("seconds") and b.get("seconds")):
            continue
        gain, times = 100 * (a["exact_match"] - b["exact_match"]), a["seconds"] / b["seconds"]
        met = above(round(gain, 6)) and times <= ratio
        out.append(f"- {name} against {other}: {gain:+.1f} points (target {wanted}), {times:.2f}x the time "
                   f"(target <= {ratio:g}x): {'met' if met else 'NOT met'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["trl", "instructkit", "sweep"],
                        help="trl, instructkit, instructkit:KEY=V,KEY=V (extra overrides), sweep")
    parser.add_argument("--trials", type=int, default=4, help="sweep trials (default 4)")
    parser.add_argument("--param", action="append", default=[], help="sweep --param (default: its search space)")
    parser.add_argument("--work", type=Path, help="where runs go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results-quality")
    parser.add_argument("--trl-worker", nargs=2, metavar=("DATA", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return train_trl(Path(args.trl_worker[0]), Path(args.trl_worker[1]))

    work = args.work or Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("INSTRUCTKIT_HOME", str(work / "home"))  # a cold tokenized-data cache for everyone
    sys.path.insert(0, str(ROOT / "bench"))
    from quality_tasks import build

    data = work / "data"
    build(data)
    rows, extra = {}, {}
    for i, variant in enumerate(args.variants):
        name, _, spec = variant.partition(":")
        print(f"== {variant}", flush=True)
        if name == "trl":
            out = run_trl(data, work)
        elif name == "instructkit":
            out = run_instructkit(data, work, f"instructkit-{i}", spec.split(",") if spec else [],
                                  baseline="untuned" not in rows)
            if "base" in out["results"]:
                rows["untuned"] = out["results"]["base"]
        elif name == "sweep":
            out = run_sweep(data, work, args.trials, args.param)
        else:
            sys.exit(f"unknown variant {variant}")
        rows[variant] = {**out["results"]["tuned"], "seconds": out["seconds"]}
        extra[variant] = {k: v for k, v in out.items() if k != "results"}
        print(f"{variant}: exact match {100 * rows[variant]['exact_match']:.1f}% in {out['seconds']:.0f} s", flush=True)
    tasks = sorted(next(iter(rows.values()))["per_task"])
    md = "\n".join([table(rows, tasks), "", *targets(rows)])
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "extra": extra}, indent=1))
    args.out.with_suffix(".md").write_text(f"`{command}`\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
