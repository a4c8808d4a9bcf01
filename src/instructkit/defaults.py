"""What `auto` in a config resolves to, decided when a run starts from the data, the model and the
hardware, each with the reason printed at start and written to config.yaml and the manifest.

The rules were chosen on the development suite (bench/quality.py, figures in bench/RESULTS.md): on a
few hundred rows a small model needs many optimizer steps (accumulation 1) and several passes, with
a held-out split choosing the best checkpoint; large datasets need neither. A resumed run keeps what
its start resolved, so resuming never changes the recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from instructkit.errors import user_error

if TYPE_CHECKING:
    from instructkit.config import RunConfig

AUTO = "auto"
# Held-out split: 5% of the rows, at least 20 and at most 1,000; none below 200 rows, where every row
# is worth more for training than for choosing a checkpoint.
MIN_ROWS_FOR_SPLIT = 200
VAL_FRACTION, VAL_MIN, VAL_MAX = 0.05, 20, 1000
# A global batch that grows with the data: small sets get many small steps, large ones smoother ones.
BATCH_BY_ROWS = ((4_000, 8), (40_000, 16), (math.inf, 32))
# Passes over small data until about this many examples were trained on, at most MAX_EPOCHS.
EXAMPLES_SEEN, MAX_EPOCHS = 1_000, 3
# Peak learning rates: LoRA with alpha = 2r on every linear layer; full tuning by model size.
LORA_LR = 1.0e-3
FULL_LR_SMALL, FULL_LR, SMALL_MODEL = 5.0e-5, 2.0e-5, 1_000_000_000
# Preference tuning: a gentler LoRA rate (the loss pushes two answers apart and needs no new format); beta
# per objective as its paper sets it (DPO and ORPO 0.1; SimPO 2.0, from its 2.0 to 2.5 range).
PREFERENCE_LORA_LR = 1.0e-4
PREFERENCE_FULL_LR = 5.0e-7
BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}
# The chosen answers' NLL next to the pairwise term (RPO). DPO alone pushes the two answers apart and lets both
# drift down: on the quickstart tasks greedy exact match fell from 97.5% to 93.8% after SFT -> DPO, and on task
# families only the pairs taught it reached 66.2% against 85.0% with the NLL term (bench/preference.py).
NLL_WEIGHT = {"dpo": 1.0, "orpo": 1.0, "simpo": 0.0}
NLL_WHY = {"dpo": "measured: with it DPO keeps the chosen answers likely and greedy answers right (bench/"
                  "preference.py: 85.0% vs 66.2% exact match on held-out prompts)",
           "orpo": "ORPO's loss has the NLL term with weight 1", "simpo": "the SimPO paper's loss has no NLL term"}
EVALS_PER_EPOCH = 4
SHORT_ANSWER = 32  # answer tokens (median over the eval set) up to which the best weights are chosen by exact match


@dataclass(frozen=True)
class Choice:
    """One resolved `auto`: the key, its value, and why."""

    key: str
    value: Any
    why: str


def auto_val_size(val_size: float | str, n_rows: int, has_eval_file: bool) -> Choice:
    """Rows held out from training for eval loss (0: none). Explicit sizes pass through."""
    if val_size != AUTO:
        return Choice("data.val_size", val_size, "set in the config")
    if has_eval_file:
        return Choice("data.val_size", 0, "data.eval_file holds the eval data")
    if n_rows < MIN_ROWS_FOR_SPLIT:
        return Choice("data.val_size", 0, f"only {n_rows} rows (< {MIN_ROWS_FOR_SPLIT}): all train, no eval split")
    n = min(VAL_MAX, max(VAL_MIN, round(VAL_FRACTION * n_rows)))
    return Choice("data.val_size", n, f"{n} of {n_rows} rows held out ({VAL_FRACTION:.0%}, {VAL_MIN} to {VAL_MAX}) "
                  "to evaluate on a schedule and keep the best weights")


def auto_accumulation(n_train: int, per_device: int, world: int) -> Choice:
    target = next(batch for rows, batch in BATCH_BY_ROWS if n_train < rows)
    steps = max(1, round(target / (per_device * world)))
    return Choice("train.gradient_accumulation_steps", steps,
                  f"a global batch of about {target} for {n_train} examples ({per_device} per device x {world} "
                  f"process(es) x {steps}); small data needs many optimizer steps")


def auto_epochs(n_train: int) -> Choice:
    epochs = max(1, min(MAX_EPOCHS, round(EXAMPLES_SEEN / n_train)))
    return Choice("train.num_train_epochs", epochs,
                  f"{epochs} pass(es) over {n_train} examples: about {EXAMPLES_SEEN:,} examples trained on, "
                  f"1 to {MAX_EPOCHS} passes")


def auto_learning_rate(method: str, n_params: int | None, objective: str = "sft") -> Choice:
    if objective != "sft":
        lr = PREFERENCE_LORA_LR if method == "lora" else PREFERENCE_FULL_LR
        return Choice("train.learning_rate", lr, f"{objective} preference tuning with {method}: small steps from "
                      "a model that already answers in the right format")
    if method == "lora":
        return Choice("train.learning_rate", LORA_LR, "LoRA with alpha = 2 x r")
    if n_params is None:
        raise user_error("train.learning_rate: auto cannot be resolved for full fine-tuning: the model's size is "
                         "unknown", "train.learning_rate", "set train.learning_rate (e.g. 2e-5)")
    small = n_params < SMALL_MODEL
    return Choice("train.learning_rate", FULL_LR_SMALL if small else FULL_LR,
                  f"full fine-tuning of a {n_params / 1e6:,.0f}M-parameter model ({'<' if small else '>='} 1B)")


def auto_eval_steps(steps_per_epoch: int) -> Choice:
    every = max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))
    return Choice("train.eval_steps", every,
                  f"about {EVALS_PER_EPOCH} evaluations per epoch of {steps_per_epoch} steps")


def _set(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    section, name = key.split(".")
    part = getattr(cfg, section).model_copy()
    setattr(part, name, value)  # validated (and coerced, 3 -> 3.0) like a value from the YAML file
    return cfg.model_copy(update={section: part})


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def resolve(cfg: RunConfig, n_train: int, val: Choice, world: int, n_params: int | None,
            previous: dict | None = None) -> tuple[RunConfig, list[Choice]]:
    """`cfg` with every `auto` of the training recipe (but eval_steps, which needs the loop) resolved;
    `val` is the held-out split the data pipeline chose (`auto_val_size`).

    `previous` is the config.yaml of the run being resumed: its values win, so a resume trains on with
    exactly the recipe it started with."""
    tc = cfg.train
    rules = {
        "train.gradient_accumulation_steps": lambda: auto_accumulation(n_train, tc.per_device_train_batch_size, world),
        "train.num_train_epochs": lambda: auto_epochs(n_train),
        "train.learning_rate": lambda: auto_learning_rate(cfg.method, n_params, cfg.objective),
    }
    if cfg.objective != "sft":
        rules["preference.beta"] = lambda: Choice("preference.beta", BETA[cfg.objective],
                                                  f"the {cfg.objective} paper's value")
        rules["preference.nll_weight"] = lambda: Choice("preference.nll_weight", NLL_WEIGHT[cfg.objective],
                                                        NLL_WHY[cfg.objective])
    return _apply(cfg, rules, previous, [val] if cfg.data.val_size == AUTO else [])


def _apply(cfg: RunConfig, rules: dict, previous: dict | None,
           choices: list[Choice] | None = None) -> tuple[RunConfig, list[Choice]]:
    """Resolve each key still `auto` by its rule, or to what the resumed run's config.yaml holds (a run from
    before the key existed resolves it anew), and set the results."""
    choices = list(choices or [])
    for key, rule in rules.items():
        if _get(cfg, key) != AUTO:
            continue
        old = _get_dict(previous, key, missing=AUTO)
        choices.append(Choice(key, old, "as resolved when this run started") if old != AUTO else rule())
    for choice in choices:
        cfg = _set(cfg, choice.key, choice.value)
    return cfg, choices


def auto_best_metric(answer_tokens: list[int]) -> Choice:
    """Short answers (labels, codes, numbers) are scored by exact match, which eval loss tracks badly: the
    loss rises as the model grows confident while more answers come out right (on the development suite
    the lowest-loss weights scored 32% exact match, the last ones 39.5%)."""
    if not answer_tokens:
        return Choice("train.best_metric", "eval_loss", "no eval data")
    median = sorted(answer_tokens)[len(answer_tokens) // 2]
    if median <= SHORT_ANSWER:
        return Choice("train.best_metric", "eval_exact_match", f"eval answers are short (median {median} tokens "
                      f"<= {SHORT_ANSWER}), so whether they come out exactly right is what counts")
    return Choice("train.best_metric", "eval_loss", f"eval answers are long (median {median} tokens > "
                  f"{SHORT_ANSWER}): exact match would rarely change")


def resolve_eval(cfg: RunConfig, steps_per_epoch: int, answer_tokens: list[int],
                 previous: dict | None = None) -> tuple[RunConfig, list[Choice]]:
    """`train.eval_steps` and `train.best_metric` once the loop's steps per epoch and the eval data's answer
    lengths are known (`answer_tokens`: supervised tokens per eval example, empty without eval data)."""
    best = (lambda: auto_best_metric(answer_tokens)) if cfg.objective == "sft" or not answer_tokens else \
        (lambda: Choice("train.best_metric", "eval_loss", f"{cfg.objective}: the held-out pairs' loss, which "
                        "keeps ranking weights after preference accuracy saturates"))
    rules = {"train.eval_steps": lambda: auto_eval_steps(steps_per_epoch) if answer_tokens
             else Choice("train.eval_steps", None, "no eval data"),
             "train.best_metric": best}
    return _apply(cfg, rules, previous)


def keep_split(cfg: RunConfig, previous: dict | None) -> RunConfig:
    """`data.val_size: auto` as the resumed run resolved it, so resuming never moves rows between the
    training and held-out sets (the data or an eval_file may have changed since)."""
    old = _get_dict(previous, "data.val_size", missing=AUTO)
    return cfg if cfg.data.val_size != AUTO or old == AUTO else _set(cfg, "data.val_size", old)


def _get_dict(data: dict | None, key: str, missing: Any = None) -> Any:
    section, name = key.split(".")
    return ((data or {}).get(section) or {}).get(name, missing)


def describe(choices: list[Choice]) -> str:
    """One line per resolved key: what it became and why (set the key in the config to choose yourself)."""
    return "\n".join(["auto (resolved at start; set a key to choose it yourself):"]
                     + [f"  {c.key} = {c.value}: {c.why}" for c in choices])
