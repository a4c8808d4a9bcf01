"""build_datasets: files -> records -> conversations -> segments -> examples, with counts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from instructkit.config import DataConfig
from instructkit.data.formats import Conversation, to_conversations
from instructkit.data.sources import read_records
from instructkit.data.templates import Template, render_segments, resolve_template
from instructkit.data.tokenize import Example, fit_length, tokenize_segments
from instructkit.errors import UserError


@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    template: Template
    stats: dict = field(default_factory=dict)


def load_conversations(data_cfg: DataConfig, seed: int) -> tuple[list[Conversation], list[Conversation], str]:
    """Train and eval conversations (eval from eval_file, or split off train by val_size)."""
    train, fmt = to_conversations(read_records(data_cfg.train_files, "data.train_file"), data_cfg.format)
    if data_cfg.eval_files:
        evals, _ = to_conversations(read_records(data_cfg.eval_files, "data.eval_file"), data_cfg.format)
        return train, evals, fmt
    if data_cfg.val_size <= 0:
        return train, [], fmt
    n_eval = int(round(len(train) * data_cfg.val_size)) if data_cfg.val_size < 1 else int(data_cfg.val_size)
    if not 1 <= n_eval < len(train):
        raise UserError(f"data.val_size={data_cfg.val_size} leaves {n_eval} of {len(train)} rows for eval. "
                        "Fix: choose a size that keeps at least one row on each side.")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [c for i, c in enumerate(train) if i not in held], [train[i] for i in sorted(held)], fmt


def tokenize_all(conversations: list[Conversation], tokenizer, template: Template, data_cfg: DataConfig,
                 split: str) -> tuple[list[Example], dict]:
    """Tokenize with masks and apply the over-length policy; counts of what was dropped or cut."""
    eot_id = tokenizer.convert_tokens_to_ids(template.eot_token)
    examples, dropped, truncated = [], [], 0
    for conv in conversations:
        segments = render_segments(template, tokenizer, conv.messages)
        ids, labels = tokenize_segments(segments, tokenizer, data_cfg.train_on_inputs)
        fitted = fit_length(ids, labels, data_cfg.max_length, data_cfg.overlength, eot_id)
        if len(ids) > data_cfg.max_length and data_cfg.overlength == "error":
            raise UserError(f"{conv.where}: the example is {len(ids)} tokens, over data.max_length="
                            f"{data_cfg.max_length}. Fix: raise data.max_length, or set data.overlength "
                            "to drop or truncate.")
        if fitted is None:
            dropped.append(conv.where)
            continue
        truncated += len(ids) > data_cfg.max_length
        examples.append(Example(fitted[0], fitted[1], conv.where))
    if not examples:
        raise UserError(f"all {len(conversations)} {split} rows are longer than data.max_length="
                        f"{data_cfg.max_length} tokens. Fix: raise data.max_length or shorten the rows.")
    return examples, {"rows": len(conversations), "dropped": len(dropped), "truncated": truncated,
                      "dropped_examples": dropped[:5]}


def build_datasets(data_cfg: DataConfig, tokenizer, seed: int) -> Datasets:
    """The tokenized train and eval sets and the template that rendered them."""
    train_conv, eval_conv, fmt = load_conversations(data_cfg, seed)
    template = resolve_template(data_cfg.template, tokenizer)
    train, train_stats = tokenize_all(train_conv, tokenizer, template, data_cfg, "train")
    evals, eval_stats = tokenize_all(eval_conv, tokenizer, template, data_cfg, "eval") if eval_conv else ([], {})
    return Datasets(train, evals, template, {"format": fmt, "template": template.name,
                                             "train": train_stats, "eval": eval_stats})
