"""Does the second stage work: supervised tuning, then DPO, on SmolLM2-135M-Instruct and the quickstart tasks.

The supervised stage sees only some task families (--sft-tasks); the preference pairs
(examples/data/pref_train.jsonl, from examples/make_preference_data.py) cover all five, so DPO has something
to teach that supervised tuning did not. On the held-out pairs (pref_test.jsonl, prompts of the quickstart's
test set, never trained on in either stage) it measures how often each model ranks the chosen answer above the
rejected one, and on the held-out prompts (test.jsonl) the exact match of greedy answers: the untuned model,
after SFT, after SFT then DPO. Every stage is the CLI a user runs, with the shipped configs.

    python bench/preference.py --out bench/results-preference      # about 20 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples/data"
CLI = [sys.executable, "-m", "instructkit"]


def run(*args: str) -> float:
    """Run an instructkit command from the repository root; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([*CLI, *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def only_tasks(source: Path, target: Path, tasks: set[str]) -> int:
    rows = [line for line in source.read_text().splitlines() if json.loads(line)["task"] in tasks]
    target.write_text("\n".join(rows) + "\n")
    return len(rows)


def evaluate(model: str, work: Path, name: str) -> dict:
    """Pair ranking on pref_test and exact match on test, for one model (a run directory or an alias)."""
    out = {}
    for kind, data in (("pairs", "pref_test.jsonl"), ("generation", "test.jsonl")):
        target = work / f"eval-{name}-{kind}"
        run("eval", model, "--data", str(DATA / data), "--out", str(target))
        out[kind] = json.loads((target / "eval.json").read_text())["tuned"]
    return out


def table(results: dict) -> str:
    stages = list(results["evals"])
    tasks = sorted(results["evals"]["sft"]["pairs"]["per_task"])
    head = "| task | in SFT data | " + " | ".join(f"pref accuracy {s}" for s in stages) + " | " + \
        " | ".join(f"exact match {s}" for s in stages) + " |"
    lines = [head, "|" + " --- |" * (2 + 2 * len(stages))]
    for task in tasks + ["all"]:
        cells = [task, "-" if task == "all" else ("yes" if task in results["sft_tasks"] else "no")]
        for metric, kind in (("pref_accuracy", "pairs"), ("exact_match", "generation")):
            for s in stages:
                scores = results["evals"][s][kind]
                value = scores[metric] if task == "all" else scores["per_task"][task][metric]
                cells.append(f"{100 * value:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    times = results["seconds"]
    spent = "; ".join(f"{name}: {seconds:.0f} s" for name, seconds in times.items())
    lines += ["", f"SFT on {results['sft_rows']} rows; training time {spent} (DPO's reference pass included); "
              f"{results['test_pairs']} held-out pairs, {results['test_prompts']} held-out prompts; variants: "
              + "; ".join(f"{name} = {' '.join(o) or 'configs/quickstart-dpo.yaml'}"
                          for name, o in results["variants"].items())]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results-preference")
    parser.add_argument("--sft-tasks", default="sentiment,topic,json_field")
    parser.add_argument("--skip-untuned", action="store_true")
    parser.add_argument("--variants", nargs="+", default=["dpo"],
                        help="DPO runs from the same SFT run: NAME or NAME:key=value,key=value (config overrides)")
    args = parser.parse_args()
    tasks = set(args.sft_tasks.split(","))
    variants = {v.partition(":")[0]: [o for o in v.partition(":")[2].split(",") if o] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench-preference-") as tmp:
        work = Path(tmp)
        sft_rows = only_tasks(DATA / "train.jsonl", work / "train.jsonl", tasks)
        only_tasks(DATA / "eval.jsonl", work / "eval.jsonl", tasks)
        seconds = {"sft": run("train", "configs/quickstart.yaml", f"output_dir={work / 'sft'}",
                              f"data.train_file={work / 'train.jsonl'}", f"data.eval_file={work / 'eval.jsonl'}")}
        for name, overrides in variants.items():
            seconds[name] = run("train", "configs/quickstart-dpo.yaml", f"model.name_or_path={work / 'sft'}",
                                f"output_dir={work / name}", *overrides)
        evals = {} if args.skip_untuned else {"untuned": evaluate("smollm2-135m-instruct", work, "untuned")}
        evals |= {name: evaluate(str(work / name), work, name) for name in ["sft", *variants]}
        curves = {name: [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()
                         if "eval_loss" in line] for name in variants}
    results = {"sft_tasks": sorted(tasks), "sft_rows": sft_rows, "seconds": seconds, "evals": evals,
               "variants": variants, "test_pairs": evals["sft"]["pairs"]["n"],
               "test_prompts": evals["sft"]["generation"]["n"], "dpo_evals": curves}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
