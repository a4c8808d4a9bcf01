"""Write the preference demo set: the quickstart prompts, each with its correct answer (chosen) and a plausible
wrong one (rejected).

Deterministic (fixed seeds), so the committed files are reproducible:

    python examples/make_preference_data.py     # writes examples/data/pref_{train,eval,test}.jsonl

Every row is `{prompt, input, chosen, rejected, task, rejected_kind}`. `prompt` and `input` are the quickstart
row's `instruction` and `input`, which instructkit renders exactly as it renders that Alpaca row, so a
preference run started from the quickstart SFT run sees the prompts it was trained on, token for token.
The rejected answer is one of:

- `label`: another label of the same task (sentiment, topic) or another field's value (json_field);
- `near_miss`: an almost-right value (an email with the wrong domain or the names swapped, a date with day
  and month swapped or off by one);
- `other_task`: the answer to a prompt of another task.

Train pairs come from the quickstart train prompts, eval pairs from its eval prompts and test pairs from its
test prompts, so no held-out prompt is trained on, in either stage (asserted below). Held-out prompts get
several pairs each (different wrong answers) to give eval and test more pairs than prompts.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_quickstart_data as quick  # noqa: E402  (the quickstart generators, reused rather than copied)

# Pairs per prompt of each quickstart split (train: the first TRAIN_PER_TASK prompts of each task).
TRAIN_PER_TASK = 80
PAIRS_PER_PROMPT = {"train": [1], "eval": [2, 1], "test": [3, 2]}  # cycled over the split's prompts
OTHER_TASK_SHARE = 0.25  # of single pairs, how many get another task's answer instead of a same-task wrong one


def _email_misses(address: str) -> list[str]:
    local, domain = address.split("@")
    first, last = local.split(".")
    other = next(d for d in quick.DOMAINS if d != domain)
    return [f"{local}@{other}", f"{last}.{first}@{domain}", f"{first}{last}@{domain}"]


def _date_misses(iso: str) -> list[str]:
    year, month, day = (int(x) for x in iso.split("-"))
    swapped = f"{year:04d}-{day:02d}-{month:02d}" if day <= 12 and day != month else None
    shifted = f"{year:04d}-{month:02d}-{day % 28 + 1:02d}"
    return [swapped or shifted, f"{year:04d}-{month % 12 + 1:02d}-{day:02d}", f"{year + 1:04d}-{month:02d}-{day:02d}"]


def same_task_wrong(row: dict) -> list[tuple[str, str]]:
    """Wrong answers of the row's own task, most plausible first, as (answer, kind)."""
    task, answer = row["task"], row["output"]
    if task == "sentiment":
        return [("negative" if answer == "positive" else "positive", "label"), ("neutral", "label")]
    if task == "topic":
        return [(label, "label") for label in sorted(quick.TOPICS) if label != answer]
    if task == "json_field":
        values = json.loads(row["input"]).values()
        return [(str(v), "label") for v in values if str(v) != answer]
    if task == "email":
        return [(x, "near_miss") for x in _email_misses(answer)]
    if task == "date_iso":
        return [(x, "near_miss") for x in _date_misses(answer)]
    raise ValueError(f"unknown task {task}")


def pairs_for(row: dict, k: int, rows: list[dict], rng: random.Random) -> list[dict]:
    """k pairs for one prompt with distinct rejected answers; with k > 1 the last is another task's answer."""
    own = same_task_wrong(row)
    rng.shuffle(own)
    other = rng.choice([r["output"] for r in rows if r["task"] != row["task"]])
    if k == 1:
        picked = [(other, "other_task")] if rng.random() < OTHER_TASK_SHARE else own[:1]
    else:
        picked = own[:k - 1] + [(other, "other_task")]
    assert len(picked) == k and len({a for a, _ in picked}) == k and row["output"] not in {a for a, _ in picked}
    return [{"prompt": row["instruction"], "input": row["input"], "chosen": row["output"], "rejected": answer,
             "task": row["task"], "rejected_kind": kind} for answer, kind in picked]


def _first_per_task(rows: list[dict], n: int) -> list[dict]:
    counts: dict[str, int] = {}
    out = []
    for row in rows:
        counts[row["task"]] = counts.get(row["task"], 0) + 1
        if counts[row["task"]] <= n:
            out.append(row)
    return out


def build(seed: int = 20261201) -> dict[str, list[dict]]:
    """Pairs per split, from the quickstart split of the same name."""
    rng = random.Random(seed)
    splits = {}
    for split, rows in quick.build().items():
        prompts = _first_per_task(rows, TRAIN_PER_TASK) if split == "train" else rows
        counts = PAIRS_PER_PROMPT[split]
        splits[split] = [pair for i, row in enumerate(prompts)
                         for pair in pairs_for(row, counts[i % len(counts)], rows, rng)]
    _check_apart(splits, quick.build())
    return splits


def _check_apart(pairs: dict[str, list[dict]], sft: dict[str, list[dict]]) -> None:
    """No held-out preference prompt is a training prompt of either stage."""
    trained = ({(r["prompt"], r["input"]) for r in pairs["train"]}
               | {(r["instruction"], r["input"]) for r in sft["train"]})
    for split in ("eval", "test"):
        held = {(r["prompt"], r["input"]) for r in pairs[split]}
        assert not held & trained, f"{split} prompts overlap the training prompts"
    assert not {(r["prompt"], r["input"]) for r in pairs["eval"]} & {(r["prompt"], r["input"]) for r in pairs["test"]}


def main(out_dir: Path = Path(__file__).parent / "data") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in build().items():
        path = out_dir / f"pref_{split}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
