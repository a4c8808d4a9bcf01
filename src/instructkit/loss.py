"""The training loss: summed next-token cross entropy over supervised positions only.

The decoder runs on every token, but the LM head (hidden x vocabulary, a large share of a small
model's compute) runs only where a label is supervised, in chunks whose logits are recomputed in
backward, so the full tokens x vocabulary logits are never materialised. Models whose logits are
post-processed (soft-capping, scaling) take the plain path through their own forward.

The loss is a module so that accelerate can wrap it (DDP hooks need the wrapped module's forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from instructkit.config import IGNORE


def _head_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class SupervisedLoss(torch.nn.Module):
    """forward(input_ids, labels, [attention_mask], [position_ids]) -> summed loss (fp32 softmax)."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 1024, compile: bool = False,
                 fast: bool | None = None):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = getattr(lm, "config", None)
        plain = any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
        has_parts = hasattr(lm, "get_decoder") and hasattr(lm, "get_output_embeddings")
        possible = has_parts and not plain and lm.get_output_embeddings() is not None
        self.fast = possible if fast is None else (fast and possible)  # fast=False: the model's own forward
        # Kept out of the module tree (no second name for the same parameters); dynamic shapes, so
        # batches of other lengths do not recompile.
        target = lm.get_decoder() if self.fast else model
        self.__dict__["_run"] = torch.compile(target, dynamic=True) if compile else target

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, sums: bool = False) -> torch.Tensor:
        if sums:  # through forward, so FSDP's root hook gathers the embeddings and head for it too
            return self.eval_sums(input_ids, labels, attention_mask, position_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if not self.fast:
            logits = self._run(**inputs, use_cache=False).logits
            return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = self._run(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]
        wanted = targets[keep]
        head = lm.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            h, y = hidden[start:start + self.chunk_tokens], wanted[start:start + self.chunk_tokens]
            if torch.is_grad_enabled():  # keep only h for backward; the chunk's logits are recomputed
                total = total + checkpoint(_head_ce, head, h, y, use_reentrant=False)
            else:
                total = total + _head_ce(head, h, y)
        return total

    @torch.no_grad()
    def eval_sums(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[summed loss, supervised tokens, tokens whose argmax is the label, examples, examples whose every
        supervised token is the argmax]. Teacher-forced, so the last counts the examples greedy decoding
        reproduces exactly (before eval's normalisation of case and punctuation). One example per row:
        eval batches are never packed."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        targets = labels[:, 1:]
        keep = targets != IGNORE
        wanted = targets[keep]
        if self.fast:
            lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            hidden = self._run(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]
            head = lm.get_output_embeddings()
        else:
            hidden, head = self._run(**inputs, use_cache=False).logits[:, :-1][keep], torch.nn.Identity()
        loss, right = hidden.new_zeros((), dtype=torch.float32), []
        for start in range(0, hidden.shape[0], self.chunk_tokens):  # never all tokens x vocabulary at once
            logits, y = head(hidden[start:start + self.chunk_tokens]).float(), wanted[start:start + self.chunk_tokens]
            loss = loss + F.cross_entropy(logits, y, reduction="sum")
            right.append(logits.argmax(-1) == y)
        hit = torch.cat(right) if right else wanted.new_zeros(0, dtype=torch.bool)
        misses = torch.zeros(labels.shape[0], device=labels.device).index_add_(0, keep.nonzero()[:, 0], (~hit).float())
        examples = keep.any(1)
        return torch.stack([loss, keep.sum().float(), hit.sum().float(), examples.sum().float(),
                            ((misses == 0) & examples).sum().float()])

    @staticmethod
    def count(batch: dict) -> int:
        """The units the summed loss runs over (supervised next-token targets); the loop divides by them."""
        return count_supervised(batch)


def count_supervised(batch: dict) -> int:
    """Supervised next-token targets in a collated batch (computed on the CPU copy: no device sync)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
