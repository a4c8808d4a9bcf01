"""Padded batches. Pad positions get attention_mask 0 and label IGNORE, whatever the pad id."""

from __future__ import annotations

from typing import Sequence

from instructkit.config import IGNORE
from instructkit.data.preference import PairExample
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


def pad_pairs(pairs: Sequence[PairExample], pad_id: int) -> dict:
    """One forward pass for a batch of B pairs: rows [2B, T], the B chosen sides first, then the B rejected
    sides in the same order (row i and row B + i are one pair), right-padded to one width. `ref_logps` [2B]
    (float32, chosen refs then rejected refs) is added when every pair has its reference log-probs."""
    import torch

    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, side="right")
    if pairs and all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32)
    return batch
