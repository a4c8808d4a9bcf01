"""Packing: examples into rows of at most max_length tokens by best-fit-decreasing.

A packed micro-batch is one row with no padding: position_ids restart at every example, no
attention mask is passed and the cache is off, which is what transformers needs to keep examples
from attending to each other (see DESIGN.md). The first label of every example is masked, so the
last token of one example is never trained to predict the first token of the next. Whether the
loaded model really isolates examples is checked on the model itself before training.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence as SequenceABC
from typing import TYPE_CHECKING, Callable, Sequence

from instructkit.config import IGNORE
from instructkit.data.tokenize import Example
from instructkit.errors import UserError, user_error

if TYPE_CHECKING:
    import torch


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= max_length, best fit, longest first (ties: lower index
    first; among bins with equal room, the oldest).

    Bins are kept by remaining room (at most max_length + 1 distinct values, each with a heap of bin
    numbers), so an example costs O(log) rather than a pass over every open bin: a million examples pack
    in seconds."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > max_length:
        i = int(np.flatnonzero(lengths > max_length)[0])
        raise ValueError(f"example {i} has {int(lengths[i])} tokens, over max_length={max_length}")
    order = np.argsort(-lengths, kind="stable").tolist()
    sizes = lengths.tolist()
    bins: list[list[int]] = []
    rooms: list[int] = []  # distinct remaining rooms with open bins, sorted
    by_room: dict[int, list[int]] = {}  # room -> heap of bin numbers
    for i in order:
        size = sizes[i]
        slot = bisect.bisect_left(rooms, size)
        if slot < len(rooms):
            room = rooms[slot]
            b = heapq.heappop(by_room[room])
            if not by_room[room]:
                rooms.pop(slot)
            bins[b].append(i)
        else:
            room, b = max_length, len(bins)
            bins.append([i])
        left = room - size
        if not by_room.get(left):
            by_room[left] = []
            bisect.insort(rooms, left)
        heapq.heappush(by_room[left], b)
    return bins


def packing_efficiency(lengths: Sequence[int], max_length: int, bins: list[list[int]] | None = None) -> float:
    """Real tokens / token slots when packed into rows of max_length."""
    bins = pack(lengths, max_length) if bins is None else bins
    return float(sum(lengths)) / (len(bins) * max_length) if bins else 0.0


class PackedRows(SequenceABC):
    """Packed rows as a lazy list: row i is the examples of bin i, read when the loader asks for it."""

    def __init__(self, examples: Sequence[Example], bins: list[list[int]], lengths: Sequence[int]):
        self.examples, self.bins = examples, bins
        self.lengths = [int(sum(lengths[i] for i in b)) for b in bins]

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return [self.examples[j] for j in self.bins[i]]


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


def padding_free_batch(examples: Sequence[Example]) -> dict:
    """A micro-batch as one padding-free row (data.padding_free): the examples and the loss of the padded batch
    (its first label is never a target either), no pad token computed."""
    return packed_batch([examples])


def use_padding_free(wanted: bool | str, per_example_attention: bool, compute_precision: str,
                     model: torch.nn.Module, vocab_size: int, say: Callable[[str], None]) -> bool:
    """data.padding_free resolved. auto is on only where the attention implementation attends the examples of a
    row one by one (instructkit's CPU attention: forward + backward of padded batches of 8 took 1.82x the
    padding-free time on long-tailed rows, 4-8% more on the quickstart's, bench/padding_free.py); elsewhere a
    row of examples could cost attention over its whole length. The model is checked to keep the examples apart first: true fails where it
    does not, auto pads."""
    if wanted is False or (wanted == "auto" and not per_example_attention):
        return False
    try:
        check_isolation(model, vocab_size, next(model.parameters()).device,
                        **isolation_tolerance(compute_precision), key="data.padding_free")
    except UserError:
        if wanted is True:
            raise
        say("note: data.padding_free: auto pads the batches: with this model, examples in one row attend to each other")
        return False
    say("padding-free batches: each micro-batch's examples in one row"
        + (" (data.padding_free: auto: the attention implementation attends them one by one)"
           if wanted == "auto" else ""))
    return True


def isolation_tolerance(compute_precision: str) -> dict:
    """check_isolation's tolerances for a compute precision (bf16 rounds a longer row differently)."""
    return {"atol": 1e-3} if compute_precision == "fp32" else {"atol": 5e-2, "rtol": 0.05}


def check_isolation(model: torch.nn.Module, vocab_size: int, device: torch.device | str, atol: float,
                    rtol: float = 0.0, key: str = "data.packing") -> None:
    """Refuse packing when the model lets packed examples see each other. A short sequence B packed after A
    must give the logits it gives after another A' of the same length (a leak shows as a difference; the
    same arithmetic otherwise, so atol is tight in any precision), and the logits B gives alone up to
    atol + rtol * max|logit| (positions restart; bf16 rounds a longer row differently: 0.3 on logits of 36
    seen for SmolLM2 on a CPU, against 23 where positions did not restart)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, other, b = (torch.randint(0, vocab_size, (1, n), generator=gen).to(device) for n in (7, 7, 5))
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits.float()
        after_a, after_other = (model(input_ids=torch.cat([first, b], dim=1), position_ids=positions,
                                      use_cache=False).logits[:, 7:].float() for first in (a, other))
    model.train(was_training)
    leak, offset = (after_a - after_other).abs().max().item(), (after_a - alone).abs().max().item()
    if leak > atol or offset > atol + rtol * alone.abs().max().item():
        raise user_error(f"{key} is on, but with this model and attention implementation examples in one row "
                         f"attend to each other (an example's logits change by {leak:.3g} with the example packed "
                         f"before it and differ by {offset:.3g} from the example run alone)", key,
                         f"set model.attn_implementation to sdpa or flash_attention_2, or {key}: false")
