"""Packing: examples into rows of at most max_length tokens by best-fit-decreasing.

A packed micro-batch is one row with no padding: position_ids restart at every example, no
attention mask is passed and the cache is off, which is what transformers needs to keep examples
from attending to each other (see DESIGN.md). The first label of every example is masked, so the
last token of one example is never trained to predict the first token of the next. Whether the
loaded model really isolates examples is checked on the model itself before training.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Sequence

from instructkit.config import IGNORE
from instructkit.data.tokenize import Example
from instructkit.errors import user_error

if TYPE_CHECKING:
    import torch


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= max_length, best fit, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining room, bin index), kept sorted
    for i in order:
        size = lengths[i]
        if size > max_length:
            raise ValueError(f"example {i} has {size} tokens, over max_length={max_length}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            room, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (room - size, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - size, len(bins) - 1))
    return bins


def packing_efficiency(lengths: Sequence[int], max_length: int) -> float:
    """Real tokens / token slots when packed into rows of max_length."""
    bins = pack(lengths, max_length)
    return sum(lengths) / (len(bins) * max_length) if bins else 0.0


def packed_batch(packs: Sequence[Sequence[Example]]) -> dict:
    """One padding-free row holding every example of the given packs."""
    import torch

    ids, labels, positions = [], [], []
    for example in (e for p in packs for e in p):
        ids += example.input_ids
        labels += [IGNORE] + list(example.labels[1:])
        positions += list(range(len(example.input_ids)))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def check_isolation(model: torch.nn.Module, vocab_size: int, device: torch.device | str, atol: float) -> None:
    """Refuse packing when the model lets packed examples see each other: logits of two short
    sequences packed in one row must equal their logits run alone."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab_size, (1, n), generator=gen).to(device) for n in (7, 5))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits.float()
        row = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[:, 7:].float()
    model.train(was_training)
    error = (packed - alone).abs().max().item()
    if error > atol:
        raise user_error(f"packing is on, but with this model and attention implementation packed examples attend "
                         f"to each other (logits differ by {error:.3g} from the example run alone)", "data.packing",
                         "set model.attn_implementation to sdpa or flash_attention_2, or data.packing: false")
