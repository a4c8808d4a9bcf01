"""Faster paths for training on a CPU, above all in bf16, where two of a LoRA step's costs are not matmuls.

Attention: on an AMD EPYC with avx512_bf16, SDPA's CPU flash kernel in bf16 took 29% of a SmolLM2 LoRA step
(its backward alone 24%) on rows of up to 256 tokens; two matmuls and a softmax did the same attention 2-4x
faster on small score tensors, and the flash kernel wins on large ones and in fp32 (bench/RESULTS.md). The
choice is a rule on device, dtype and size, not a timing, so a resumed run takes the same path as the run it
continues. Registered with transformers as "sdpa_instructkit_cpu" with SDPA's mask format (True = attend, None =
causal); everything outside the rule goes to transformers' own SDPA function unchanged. In any dtype, a
padding-free packed row (data.packing) is attended example by example instead of over its whole length.

Dropout: LoRA's input dropout drew one random number per element through torch's Bernoulli sampler, 13% of
the same step; `CpuDropout` draws four 16-bit numbers from each 64-bit one.
"""

from __future__ import annotations

import itertools
import weakref

import torch

# "sdpa" in the name makes transformers refuse, at load, models that cannot run SDPA (attention sinks,
# softcapping), as it refuses them for "sdpa" itself; the fallback below would otherwise drop what they pass.
NAME = "sdpa_instructkit_cpu"
# The largest score tensor (batch x heads x length^2) for the matmul path. SmolLM2's shapes (9 heads), batch 8,
# bf16 forward and backward on the EPYC: 4.8x faster at 64 tokens, 2x at 200 (2.9M scores); at 208 tokens the
# fp32 softmax outgrows the caches and the two tie, at 512 the matmul path is 2.3x slower.
MATMUL_MAX_SCORES = 3 * 2**20
# A packed row's examples are attended in batches of similar length of at most this many scores: a 1650-token
# row of fourteen examples (SmolLM2 LoRA, bf16, forward + backward of the decoder) took 2.07-2.11 s at 2^20,
# 2.15-2.38 s at 2^19 and 2.33-2.51 s at 3 x 2^20 (interleaved, median of 5).
SEGMENT_BATCH_SCORES = 2**20


def register() -> str:
    """Make NAME an attention implementation transformers can load a model with (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, L, D], key/value [B, KV, S, D] -> ([B, L, H, D], None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    lengths = packed_lengths(query, attention_mask, kwargs.get("position_ids"), dropout, causal, kwargs)
    if lengths:
        return segment_attention(query, key, value, lengths, scale), None
    if not uses_matmul_path(query, key, attention_mask, dropout, causal, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return matmul_attention(query, key, value, attention_mask, scale), None


def packed_lengths(query: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                   dropout: float, causal: bool, extra: dict) -> list[int]:
    """The example lengths of a padding-free packed row (one row whose positions restart at each example,
    as data.packing makes it), when its mask is exactly causal within each example and empty across them;
    else []. transformers builds such a mask only where no padding mask was given, so it is verified here."""
    if (not _plain_cpu_attention(query, mask, dropout, extra) or query.shape[0] != 1 or mask is None
            or position_ids is None or position_ids.shape[-1] != query.shape[2] or not causal):
        return []
    if (known := _VERIFIED.get(mask, position_ids)) is not None:
        return known  # every layer of a forward gets the same mask: verified once, not once per layer
    positions = position_ids.reshape(-1)
    example = (torch.diff(positions, prepend=positions[:1] - 1) != 1).cumsum(0)  # transformers' rule
    lengths: list[int] = []
    length = positions.shape[0]
    if example[-1] != 0 and mask.shape[-2:] == (length, length):  # else one example: nothing to split
        # block by block, with no row-sized temporary (a padding-free row of 8 x 2048 tokens has a 268 MB mask):
        # every example's diagonal block causal, and as many True entries as those blocks hold, so none elsewhere
        square, counts = mask.reshape(-1, length, length)[0], torch.unique_consecutive(example, return_counts=True)[1]
        starts = (torch.cumsum(counts, 0) - counts).tolist()
        if int(torch.count_nonzero(square)) == int((counts * (counts + 1) // 2).sum()) and all(
                torch.equal(square[s:s + n, s:s + n], torch.ones(n, n, dtype=torch.bool, device=mask.device).tril_())
                for s, n in zip(starts, counts.tolist())):
            lengths = counts.tolist()
    _VERIFIED.put(mask, position_ids, lengths)
    return lengths


class _LastVerified:
    """The answer for the last (mask, position_ids) pair, kept while both tensors live unchanged: weak
    references (a freed tensor's id can be reused) and version counters (an in-place change invalidates)."""

    def __init__(self):
        self.entry: tuple | None = None

    def get(self, mask: torch.Tensor, positions: torch.Tensor) -> list[int] | None:
        if self.entry is None:
            return None
        mask_ref, mask_version, pos_ref, pos_version, lengths = self.entry
        if (mask_ref() is mask and pos_ref() is positions and mask._version == mask_version
                and positions._version == pos_version):
            return lengths
        return None

    def put(self, mask: torch.Tensor, positions: torch.Tensor, lengths: list[int]) -> None:
        self.entry = (weakref.ref(mask), mask._version, weakref.ref(positions), positions._version, lengths)


_VERIFIED = _LastVerified()


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
                      scale: float) -> torch.Tensor:
    """Causal attention of each packed example on its own, so the work is the sum of the examples' squared
    lengths instead of the square of the row's length (which made packing slower than padding on a CPU).
    Examples of similar length are gathered into padded batches for attention only, each batch small enough
    for the matmul path in bf16 (one batch of all fourteen examples of a 1650-token row went to SDPA's slow
    bf16 kernel); one index puts the outputs back in the row's order."""
    plan = _segment_plan(tuple(lengths), query.shape[1], query.device)
    outputs = []
    for index, mask, examples, longest in plan.batches:
        # index_select, not advanced indexing: its backward is an index_add of whole rows, where t[:, index]
        # went back through index_put with accumulation, 6% of a packed step (padding slots read token 0, masked)
        q, k, v = (t[0].index_select(1, index).view(t.shape[1], examples, longest, t.shape[-1]).transpose(0, 1)
                   for t in (query, key, value))
        if _matmul_is_faster(q):
            out = matmul_attention(q, k, v, mask, scale)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                   enable_gqa=True).transpose(1, 2)
        outputs.append(out.reshape(examples * longest, *out.shape[2:]))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.index_select(0, plan.back).unsqueeze(0)  # [1, L, H, D] in the row's order


class _SegmentPlan:
    """What segment_attention needs besides the tensors, the same in every layer of a forward: per batch of
    similar-length examples (gather index into the row, padding slots 0; causal mask with padding; examples;
    longest), and `back`, each row position's slot in the batches' concatenated padded outputs."""

    def __init__(self, lengths: tuple[int, ...], heads: int, device: torch.device):
        offsets = [0, *itertools.accumulate(lengths)][:-1]
        self.batches, back, done = [], [0] * sum(lengths), 0
        for batch in _similar_length_batches(list(lengths), heads):
            longest = max(lengths[i] for i in batch)
            index = [0] * (len(batch) * longest)
            for slot, i in enumerate(batch):
                for j in range(lengths[i]):
                    index[slot * longest + j] = offsets[i] + j
                    back[offsets[i] + j] = done + slot * longest + j
            real = torch.arange(longest)[None, :] < torch.tensor([lengths[i] for i in batch])[:, None]
            mask = torch.ones(longest, longest, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
            self.batches.append((torch.tensor(index, device=device), mask.to(device), len(batch), longest))
            done += len(batch) * longest
        self.back = torch.tensor(back, device=device)


_PLANS: dict[tuple, _SegmentPlan] = {}  # the last few rows' plans: 30 layers, forward and backward, share one


def _segment_plan(lengths: tuple[int, ...], heads: int, device: torch.device) -> _SegmentPlan:
    key = (lengths, heads, device)
    if key not in _PLANS:
        if len(_PLANS) >= 4:
            _PLANS.clear()
        _PLANS[key] = _SegmentPlan(lengths, heads, device)
    return _PLANS[key]


def _similar_length_batches(lengths: list[int], heads: int) -> list[list[int]]:
    """Example indices by length, cut into batches whose padded score tensor stays within SEGMENT_BATCH_SCORES
    (one example per batch at least)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and (len(batches[-1]) + 1) * heads * lengths[i] ** 2 <= SEGMENT_BATCH_SCORES:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def uses_matmul_path(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float,
                     causal: bool, extra: dict) -> bool:
    """Short bf16/fp16 self-attention on a CPU, with nothing the plain path does not implement."""
    length = query.shape[2]
    return (_plain_cpu_attention(query, mask, dropout, extra) and _matmul_is_faster(query)
            and 1 < length and key.shape[2] == length and (mask is not None or causal))


def _plain_cpu_attention(query: torch.Tensor, mask: torch.Tensor | None, dropout: float, extra: dict) -> bool:
    """On a CPU, no attention dropout, a bool mask shared by all heads (or none), and nothing the matmul and
    per-example paths do not implement (softcapping, sliding windows, position biases, attention sinks)."""
    return (query.device.type == "cpu" and not dropout
            and (mask is None or mask.dtype == torch.bool and mask.shape[1] == 1)
            and not any(extra.get(k) is not None for k in ("softcap", "sliding_window", "position_bias", "s_aux")))


def _matmul_is_faster(query: torch.Tensor) -> bool:
    """bf16/fp16 with a score tensor (batch x heads x length^2) that stays in the caches."""
    batch, heads, length, _ = query.shape
    return query.dtype in (torch.bfloat16, torch.float16) and batch * heads * length**2 <= MATMUL_MAX_SCORES


def matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with an fp32 softmax, as transformers' eager attention computes it. The
    query heads that share a key/value head are stacked into one matmul, so k and v are never repeated."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(batch, kv_heads, groups * length, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).view(batch, kv_heads, groups, length, -1) * scale
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    else:
        mask = mask.unsqueeze(2)  # [B, 1, L, S] -> [B, 1, 1, L, S]: one mask for every head
    # the most negative finite value, as eager attention uses: a row with nothing to attend (a pad position)
    # gets uniform weights instead of NaN
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, groups * length, -1), value)
    return out.view(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous()  # v's width may differ


class CpuDropout(torch.nn.Module):
    """nn.Dropout with a 4x cheaper random draw on a CPU: one 64-bit random number gives four 16-bit draws (an
    element is kept when its draw is at least p * 65536), where torch's Bernoulli sampler draws one number per
    element. p is thereby rounded to 1/65536. Elsewhere, and in eval, exactly nn.Dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p or x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, self.training)
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-2**63, None)  # every 64-bit value
        draws = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform over -32768..32767
        dropped = round(self.p * 65536)
        # the scale of the probability actually kept, so the output stays unbiased
        return _KeepDraws.apply(x, draws, dropped - 32768, 65536 / (65536 - dropped))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _KeepDraws(torch.autograd.Function):
    """x * keep * scale with keep = (draws >= threshold), forward and backward as multiplies by a 0/1 tensor in
    x's dtype: torch.where and bool masks take 5-10x a multiply's time on a CPU. The same values as
    where(keep, x, 0) * scale, bit for bit (times one is exact; the scale is applied as a Python number, which
    the kernel keeps in fp32 for bf16 inputs). Backward keeps the 16-bit draws and rebuilds the 0/1 tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, draws: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        ctx.save_for_backward(draws)
        ctx.threshold, ctx.scale = threshold, scale
        return (x * _ones_where_kept(draws, threshold, x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (draws,) = ctx.saved_tensors
        return (grad * _ones_where_kept(draws, ctx.threshold, grad.dtype)).mul_(ctx.scale), None, None, None


def _ones_where_kept(draws: torch.Tensor, threshold: int, dtype: torch.dtype) -> torch.Tensor:
    ones = torch.empty(draws.shape, dtype=dtype)
    return torch.ge(draws, threshold, out=ones)  # written straight into the float tensor: no bool, no cast


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Replace the dropout of every LoRA layer (peft's lora_dropout) with CpuDropout; returns how many."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, drop in list(drops.items()):
                if type(drop) is torch.nn.Dropout:
                    drops[name] = CpuDropout(drop.p)
                    replaced += 1
    return replaced
