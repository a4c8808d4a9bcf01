"""The training loss: summed next-token cross entropy over supervised positions only.

The decoder runs on every token, but the LM head (hidden x vocabulary, a large share of a small
model's compute) runs only where a label is supervised, in chunks, so the full tokens x vocabulary logits
are never materialised. A frozen head (LoRA) has each chunk's gradient computed in forward and its logits
freed at once (FrozenHeadCE); a trained head's large chunks are recomputed in backward. Models whose logits are
post-processed (soft-capping, scaling) take the plain path through their own forward.

The loss is a module so that accelerate can wrap it (DDP hooks need the wrapped module's forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from instructkit.config import IGNORE
from instructkit.kernels import fused_head_loss


def _head_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _head_logp(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


# With a trained head (full fine-tuning), below this size (fp32 logits of one chunk; autograd also keeps their
# log-softmax) a chunk's logits are kept for backward: recomputing them costs a head matmul.
KEEP_LOGITS_BYTES = 64 * 2**20


def frozen_head(head: torch.nn.Module) -> bool:
    """A plain linear head that takes no gradient (LoRA leaves it frozen; a quantized or adapted head is not
    plain, and full fine-tuning trains it) and whose weight stays in place after its forward (DeepSpeed ZeRO-3
    gathers a partitioned weight, marked by `ds_id`, only for the module's own forward): what FrozenHeadCE needs."""
    return (type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())
            and not hasattr(head.weight, "ds_id"))


class FrozenHeadCE(torch.autograd.Function):
    """Summed cross entropy of a frozen LM head's logits (LoRA: the head takes no gradient), with the gradient
    with respect to the hidden states computed in forward: softmax minus the one-hot target, times the head's
    weight, as autograd's backward would compute it (in the head's compute dtype). The chunk's logits are freed
    at once, neither kept for backward nor recomputed there (a second head matmul, cast and log-softmax). The
    loss is a scalar, so backward only scales the saved gradient: right for any use of the loss downstream."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        dtype, logits = logits.dtype, logits.float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        loss = (lse.squeeze(1) - logits.gather(1, targets[:, None]).squeeze(1)).sum()
        probs = logits.sub_(lse).exp_()  # the softmax, in place: one chunk of fp32 logits at a time, never two
        probs[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
        ctx.save_for_backward(torch.matmul(probs.to(dtype), head.weight).to(hidden.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad.to(grad_hidden.dtype), None, None


class SupervisedLoss(torch.nn.Module):
    """forward(input_ids, labels, [attention_mask], [position_ids]) -> summed loss (fp32 softmax)."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 1024, compile: bool = False,
                 fast: bool | None = None, keep_logits_bytes: int = KEEP_LOGITS_BYTES):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.keep_logits_bytes = keep_logits_bytes
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
        # Liger's fused linear cross entropy where model.kernels chose it: fed the supervised rows below, as the
        # chunked head is, so the loss means the same.
        self.__dict__["_fused_ce"] = fused_head_loss(lm) if self.fast else None

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
        if self._fused_ce is not None and torch.is_grad_enabled():
            fused = self._fused_ce(head, hidden, wanted)
            if fused is not None:
                return fused
        total = hidden.new_zeros((), dtype=torch.float32)
        frozen = torch.is_grad_enabled() and hidden.requires_grad and frozen_head(head)
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            h, y = hidden[start:start + self.chunk_tokens], wanted[start:start + self.chunk_tokens]
            if frozen:  # the gradient computed now: no logits kept, none recomputed
                total = total + FrozenHeadCE.apply(h, head, y)
            elif torch.is_grad_enabled() and self._recompute(h, head):  # keep only h; the logits are recomputed
                total = total + checkpoint(_head_ce, head, h, y, use_reentrant=False)
            else:
                total = total + _head_ce(head, h, y)
        return total

    def _recompute(self, hidden: torch.Tensor, head: torch.nn.Module) -> bool:
        """Whether a chunk's logits are recomputed in backward rather than kept: only where keeping them
        would cost memory worth the second head matmul (short answers supervise a few dozen tokens a batch)."""
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        return hidden.shape[0] * vocab * 4 > self.keep_logits_bytes  # fp32 logits, as _head_ce makes them

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

    def token_logps(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The log-probability of each supervised target in fp32 (row-major order of labels[:, 1:] != IGNORE),
        the LM head run only on those positions, in chunks recomputed in backward: what sequence-level
        objectives are built from."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        keep = labels[:, 1:] != IGNORE
        wanted = labels[:, 1:][keep]
        if self.fast:
            lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            hidden, head = self._run(**inputs, use_cache=False).last_hidden_state[:, :-1][keep], \
                lm.get_output_embeddings()
        else:
            hidden, head = self._run(**inputs, use_cache=False).logits[:, :-1][keep], torch.nn.Identity()
        parts = []
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            h, y = hidden[start:start + self.chunk_tokens], wanted[start:start + self.chunk_tokens]
            grad = torch.is_grad_enabled() and h.requires_grad
            parts.append(checkpoint(_head_logp, head, h, y, use_reentrant=False) if grad else _head_logp(head, h, y))
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    eval_width = 5

    @staticmethod
    def eval_summary(total: torch.Tensor) -> dict[str, float]:
        """eval_loss per supervised token, token accuracy and teacher-forced exact match, from summed eval_sums."""
        return {"eval_loss": float(total[0] / total[1].clamp(min=1)),
                "eval_accuracy": float(total[2] / total[1].clamp(min=1)),
                "eval_exact_match": float(total[4] / total[3].clamp(min=1)),
                "n_tokens": float(total[1]), "n_examples": float(total[3])}  # for the noise of the accuracies

    @staticmethod
    def count(batch: dict) -> int:
        """The units the summed loss runs over (supervised next-token targets); the loop divides by them."""
        return count_supervised(batch)


def count_supervised(batch: dict) -> int:
    """Supervised next-token targets in a collated batch (computed on the CPU copy: no device sync)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


LN2 = 0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (where each form loses precision). Each branch
    only ever sees inputs it handles, since torch.where backpropagates through both: x at 0 (an answer whose
    every token has probability 1 in fp32) would otherwise give an infinite value and a NaN gradient."""
    low = x < -LN2
    left = torch.log1p(-torch.exp(torch.where(low, x, torch.full_like(x, -LN2))))
    right = torch.log(-torch.expm1(torch.where(low, torch.full_like(x, -LN2), x).clamp(max=-1e-7)))
    return torch.where(low, left, right)


class PreferenceLoss(torch.nn.Module):
    """DPO, ORPO and SimPO over a batch of B pairs: rows [chosen x B, rejected x B] (data/collate.pad_pairs),
    each side's log-probability summed over its answer tokens (the mask built while tokenizing).

    - dpo: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with conservative label smoothing; the
      reference log-probs come with the batch (`ref_logps`, computed once before training: reference.py).
    - simpo: -log sigmoid(beta * (pi_c / |c| - pi_r / |r|) - gamma), length-normalised, no reference.
    - orpo: the chosen answer's NLL per token plus -beta * log sigmoid(log odds(c) - log odds(r)), the odds of
      the mean per-token probability; no reference.
    `nll_weight` > 0 adds the chosen answer's NLL per token, times the weight, to DPO and SimPO (RPO, Pang et al.
    2024: it keeps the chosen answers likely, which the pairwise term alone lets drift down); ORPO always has it
    with weight 1. The forward gives summed components and `count` their units (pairs; the NLL: chosen answer
    tokens), so the loop's normalisation over micro-batches and processes gives each component's global mean.
    """

    def __init__(self, model: torch.nn.Module, kind: str, beta: float, label_smoothing: float = 0.0,
                 gamma: float = 0.5, nll_weight: float = 0.0, chunk_tokens: int = 1024, compile: bool = False,
                 fast: bool | None = None):
        super().__init__()
        self.scorer = SupervisedLoss(model, chunk_tokens, compile, fast)
        self.kind, self.beta, self.label_smoothing, self.gamma = kind, beta, label_smoothing, gamma
        self.nll_weight = 1.0 if kind == "orpo" else nll_weight
        self.eval_width = 2 * (2 if self.nll_weight else 1) + 4  # loss sums, their units, then the reward stats
        self._stats: torch.Tensor | None = None

    def sequence_logps(self, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed answer log-prob, answer tokens) per row."""
        token_logps = self.scorer.token_logps(input_ids, labels, attention_mask)
        keep = labels[:, 1:] != IGNORE
        # Scattered back into rows and summed along them (not index_add, whose CUDA sums are not deterministic).
        per_position = token_logps.new_zeros(keep.shape).masked_scatter(keep, token_logps)
        return per_position.sum(1), keep.sum(1).to(token_logps.dtype)

    def terms(self, logps: torch.Tensor, lengths: torch.Tensor, ref_logps: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair loss, chosen reward, rejected reward) from the rows' summed log-probs."""
        b = logps.shape[0] // 2
        if self.kind == "dpo":
            if ref_logps is None:
                raise RuntimeError("dpo needs the batch's ref_logps (reference.attach_reference)")
            chosen, rejected = self.beta * (logps[:b] - ref_logps[:b]), self.beta * (logps[b:] - ref_logps[b:])
            return self._sigmoid_loss(chosen - rejected), chosen, rejected
        # A pair side without answer tokens (eval filler) gets a stand-in mean; its pair is masked out later.
        mean = torch.where(lengths > 0, logps / lengths.clamp(min=1), torch.full_like(logps, -1.0))
        chosen, rejected = self.beta * mean[:b], self.beta * mean[b:]
        if self.kind == "simpo":
            return self._sigmoid_loss(chosen - rejected - self.gamma), chosen, rejected
        log_odds = (mean[:b] - mean[b:]) - (log1mexp(mean[:b]) - log1mexp(mean[b:]))
        return -self.beta * F.logsigmoid(log_odds), chosen, rejected

    def _sigmoid_loss(self, margin: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                ref_logps: torch.Tensor | None = None, sums: bool = False) -> torch.Tensor:
        logps, lengths = self.sequence_logps(input_ids, labels, attention_mask)
        loss, chosen, rejected = self.terms(logps, lengths, ref_logps)
        b = chosen.shape[0]
        # A pair with an unsupervised side (the filler that evens out eval shards) counts for nothing.
        real = ((lengths[:b] > 0) & (lengths[b:] > 0)).float()
        parts = [(loss * real).sum()]
        if self.nll_weight:  # the SFT term: the chosen answers' NLL, per token over the whole step
            parts.append(-self.nll_weight * logps[:b].sum())
        stats = torch.stack([real.sum(), (chosen * real).sum(), (rejected * real).sum(),
                             ((chosen > rejected).float() * real).sum()]).detach()
        if sums:
            units = [real.sum()] + ([lengths[:b].sum()] if self.nll_weight else [])
            return torch.cat([torch.stack(parts).detach(), torch.stack(units), stats])
        if torch.is_grad_enabled():
            self._stats = stats if self._stats is None else self._stats + stats
        return torch.stack(parts) if len(parts) > 1 else parts[0]

    def count(self, batch: dict) -> int | tuple[int, int]:
        """Pairs with both answers supervised; for ORPO also the chosen answers' tokens."""
        b = batch["input_ids"].shape[0] // 2
        supervised = batch["labels"][:, 1:] != IGNORE
        pairs = int((supervised[:b].any(1) & supervised[b:].any(1)).sum())
        return (pairs, int(supervised[:b].sum())) if self.nll_weight else pairs

    def pop_stats(self) -> torch.Tensor | None:
        """[pairs, summed chosen rewards, summed rejected rewards, pairs ranked right] since the last call."""
        stats, self._stats = self._stats, None
        return stats

    @staticmethod
    def stats_summary(stats, prefix: str = "") -> dict[str, float]:
        pairs = max(float(stats[0]), 1.0)
        chosen, rejected = float(stats[1]) / pairs, float(stats[2]) / pairs
        return {f"{prefix}rewards_chosen": chosen, f"{prefix}rewards_rejected": rejected,
                f"{prefix}reward_margin": chosen - rejected, f"{prefix}pref_accuracy": float(stats[3]) / pairs}

    def eval_summary(self, total: torch.Tensor) -> dict[str, float]:
        k = 2 if self.nll_weight else 1
        loss = sum(float(total[i] / total[k + i].clamp(min=1)) for i in range(k))
        return {"eval_loss": loss, **self.stats_summary(total[2 * k:], "eval_"), "n_examples": float(total[2 * k])}
