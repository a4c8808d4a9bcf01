"""cpu_kernels: the matmul attention computes what SDPA computes (values and gradients, padding, packing,
grouped heads), transformers loads a model with it and routes only the calls the rule names to it, and
CpuDropout is a dropout: the right rate, the right scale, gradients through kept elements only, seeded."""

import pytest
import torch
import torch.nn.functional as F

from instructkit import cpu_kernels
from instructkit.cpu_kernels import CpuDropout, matmul_attention, register, use_cpu_dropout


def _qkv(batch=3, heads=6, kv_heads=2, length=12, dim=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, h, length, dim, generator=gen, dtype=dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def _masks(batch=3, length=12):
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    lengths = torch.tensor([length, 7, 3])[:batch]
    padded = causal[None, None] & (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :]
    segment = (torch.arange(length) >= 5).long()  # two packed examples: 5 tokens, then 7
    packed = (causal & (segment[:, None] == segment[None, :]))[None, None].expand(batch, 1, length, length)
    return {"causal (None)": None, "padded": padded, "packed": packed}


@pytest.mark.parametrize("kind", ["causal (None)", "padded", "packed"])
def test_matmul_attention_equals_sdpa_in_values_and_gradients(kind):
    mask = _masks()[kind]
    q, k, v = _qkv()
    ours = matmul_attention(q, k, v, mask, 0.3)
    ours.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                               attn_mask=mask, is_causal=mask is None, scale=0.3).transpose(1, 2)
    reference.square().sum().backward()
    rows = slice(None) if kind != "padded" else (0, slice(None))  # pad rows of a padded batch: nobody reads them
    assert torch.allclose(ours[rows], reference[rows], atol=1e-5)
    for ours_grad, t in zip(grads, (q, k, v)):
        assert torch.allclose(ours_grad, t.grad, atol=1e-4)


def test_the_rule_takes_short_bf16_self_attention_only():
    short = torch.zeros(2, 4, 16, 8, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    assert cpu_kernels.uses_matmul_path(short, short, mask, 0.0, True, {})
    assert cpu_kernels.uses_matmul_path(short, short, None, 0.0, True, {})
    assert not cpu_kernels.uses_matmul_path(short.float(), short.float(), mask, 0.0, True, {})  # fp32: SDPA wins
    assert not cpu_kernels.uses_matmul_path(short, short[:, :, :1], mask, 0.0, True, {})  # cached decoding
    assert not cpu_kernels.uses_matmul_path(short, short, None, 0.0, False, {})  # bidirectional
    assert not cpu_kernels.uses_matmul_path(short, short, mask, 0.1, True, {})  # attention dropout
    assert not cpu_kernels.uses_matmul_path(short, short, mask, 0.0, True, {"sliding_window": 4})
    assert not cpu_kernels.uses_matmul_path(short, short, mask.float(), 0.0, True, {})
    long = torch.zeros(8, 9, 256, 8, dtype=torch.bfloat16)  # 4.7M scores: the flash kernel is faster
    assert not cpu_kernels.uses_matmul_path(long, long, None, 0.0, True, {})
    from instructkit import estimate

    assert estimate.MATMUL_MAX_SCORES == cpu_kernels.MATMUL_MAX_SCORES  # the estimate counts the same rule


def test_a_model_loaded_with_it_matches_sdpa_and_uses_the_matmul_path_in_bf16(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []
    real = cpu_kernels.matmul_attention
    monkeypatch.setattr(cpu_kernels, "matmul_attention", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    logits = {}
    for attn in ("sdpa", register()):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation=attn)
        logits[attn] = model(input_ids=ids, attention_mask=mask).logits.float()
    assert len(calls) == 2  # both layers
    real_tokens = mask.bool()
    difference = (logits["sdpa"] - logits[register()]).abs()[real_tokens].max().item()
    assert difference < 0.05 * logits["sdpa"].abs().max().item()


def test_cpu_dropout_drops_at_its_rate_scales_and_passes_gradients_through_kept_elements():
    torch.manual_seed(0)
    drop = CpuDropout(0.05).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.95) < 0.002
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.95))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(y[kept], 1 / 0.95))
    torch.manual_seed(0)
    assert torch.equal(CpuDropout(0.05).train()(torch.ones(1000, 1000)), y.detach())  # seeded: reproducible
    assert torch.equal(drop.eval()(x), x)
    odd = torch.ones(3, 5, dtype=torch.bfloat16)  # a size that is not a multiple of four draws
    assert drop.train()(odd).shape == odd.shape


def test_lora_layers_get_the_cpu_dropout(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from instructkit.config import LoraConfig
    from instructkit.models import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    drops = [m for m in model.modules() if isinstance(m, CpuDropout)]
    assert len(drops) == 4 and all(d.p == 0.1 for d in drops)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert use_cpu_dropout(model) == 0  # nothing left to replace


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_row_is_attended_example_by_example_with_the_same_result(dtype):
    from instructkit.cpu_kernels import packed_lengths, segment_attention

    q, k, v = _qkv(batch=1, dtype=dtype)
    mask = _masks(batch=1)["packed"]
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    assert packed_lengths(q, mask, positions, 0.0, True, {}) == [5, 7]
    ours = segment_attention(q, k, v, [5, 7], 0.3)
    reference = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(3, 1),
                                               v.float().repeat_interleave(3, 1), attn_mask=mask,
                                               scale=0.3).transpose(1, 2)
    assert torch.allclose(ours.float(), reference, atol=1e-5 if dtype == torch.float32 else 3e-2)
    # anything but an exact per-example causal mask keeps the whole-row path
    assert packed_lengths(q, _masks(batch=1)["padded"], positions, 0.0, True, {}) == []
    assert packed_lengths(q, mask, torch.arange(12)[None], 0.0, True, {}) == []
    assert packed_lengths(q, mask, positions, 0.1, True, {}) == []


@pytest.mark.parametrize("one_per_batch", [False, True])
def test_packed_attention_gradients_and_one_mask_check_per_forward(monkeypatch, one_per_batch):
    """Gradients through the per-example gather equal whole-row attention's, with the examples in one batch or
    each in its own (put back in the row's order); the mask every layer receives is verified once while it
    lives unchanged, and again after an in-place change."""
    from instructkit.cpu_kernels import packed_lengths, segment_attention

    if one_per_batch:
        monkeypatch.setattr(cpu_kernels, "SEGMENT_BATCH_SCORES", 1)
    lengths = [7, 5] if one_per_batch else [5, 7]  # [7, 5]: sorted by length, the examples swap places
    q, k, v = _qkv(batch=1)
    segment = (torch.arange(12) >= lengths[0]).long()
    mask = (torch.ones(12, 12, dtype=torch.bool).tril() & (segment[:, None] == segment[None, :]))[None, None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    grad = torch.randn(1, 12, 6, 8, generator=torch.Generator().manual_seed(1))
    segment_attention(q, k, v, lengths, 0.3).backward(grad)
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask,
                                   scale=0.3).transpose(1, 2).backward(grad)
    assert all(torch.allclose(a, t.grad, atol=1e-5) for a, t in zip(ours, (q, k, v)))

    checks = []
    count = torch.count_nonzero
    monkeypatch.setattr(torch, "count_nonzero", lambda a: checks.append(1) or count(a))
    assert [packed_lengths(q, mask, positions, 0.0, True, {}) for _ in range(3)] == [lengths] * 3
    assert len(checks) == 1
    mask[0, 0, 11, 0] = True  # an in-place change: a leak from the first example, checked again and refused
    assert packed_lengths(q, mask, positions, 0.0, True, {}) == [] and len(checks) == 2
    mask[0, 0, 1, 1] = False  # as many entries as the causal blocks hold, but one block is not causal: refused
    assert packed_lengths(q, mask, positions, 0.0, True, {}) == [] and len(checks) == 3


def test_a_model_that_cannot_run_sdpa_is_refused_at_load_as_with_sdpa():
    """GPT-OSS passes attention sinks, which the SDPA fallback would drop: transformers refuses it for any
    implementation named with "sdpa", so the name carries it."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="does not support an attention implementation"):
        AutoModelForCausalLM.from_config(cfg, attn_implementation=register())


def test_values_narrower_than_queries_and_per_head_masks():
    q, k, _ = _qkv(batch=2)
    v = torch.randn(2, 2, 12, 4)  # DeepSeek-style attention: value heads narrower than query heads
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                               is_causal=True, scale=0.3).transpose(1, 2)
    assert torch.allclose(matmul_attention(q, k, v, None, 0.3), reference, atol=1e-5)
    per_head = torch.ones(2, 6, 12, 12, dtype=torch.bool)  # a mask per head is left to SDPA
    assert not cpu_kernels.uses_matmul_path(q.bfloat16(), k.bfloat16(), per_head, 0.0, True, {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_multiplies_exactly_as_the_masked_form(dtype):
    """The multiply-by-ones form gives where(keep, x, 0) * scale bit for bit, forward and backward, from the same
    random draws (so runs and resumes made before it reproduce)."""
    torch.manual_seed(1)
    x = torch.randn(7, 33, dtype=dtype, requires_grad=True)
    grad = torch.randn(7, 33, dtype=dtype)
    torch.manual_seed(2)
    y = CpuDropout(0.1).train()(x)
    y.backward(grad)
    torch.manual_seed(2)
    words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-2**63, None)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= round(0.1 * 65536) - 32768
    scale = 65536 / (65536 - round(0.1 * 65536))
    ref = x.detach().clone().requires_grad_()
    expected = torch.where(keep, ref, 0) * scale
    expected.backward(grad)
    assert torch.equal(y.detach(), expected.detach()) and torch.equal(x.grad, ref.grad)
