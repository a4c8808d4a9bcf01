"""Padded batches. Pad positions get attention_mask 0 and label IGNORE, whatever the pad id."""

from __future__ import annotations

from typing import Sequence

from instructkit.config import IGNORE
from instructkit.data.tokenize import Example


def pad_batch(examples: Sequence[Example], pad_id: int, side: str = "right") -> dict:
    """Tensors input_ids, attention_mask, labels, padded to the longest example on `side`."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        n = width - len(e.input_ids)
        pad = (lambda seq, fill: seq + [fill] * n) if side == "right" else (lambda seq, fill: [fill] * n + seq)
        ids.append(pad(list(e.input_ids), pad_id))
        mask.append(pad([1] * len(e.input_ids), 0))
        labels.append(pad(list(e.labels), IGNORE))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
