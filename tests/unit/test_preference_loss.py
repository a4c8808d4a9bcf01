"""The preference losses against the anchor: DPO and ORPO equal TRL's DPOTrainer and ORPOTrainer (loss and
gradients within 1e-5 in fp32, on the same tiny model and tokens); SimPO and label smoothing against their
papers' formulas on hand-computed numbers; and the loop's normalisation makes the split of a batch invisible."""

import copy
import math

import pytest
import torch

from instructkit.config import IGNORE
from instructkit.loss import PreferenceLoss, log1mexp
from tests.conftest import make_byte_tokenizer

ROWS = [{"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " five"},
        {"prompt": "Color of the sky:", "chosen": " blue", "rejected": " green!"},
        {"prompt": "Hi", "chosen": " hello there", "rejected": " no"}]


def tiny(seed: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def max_grad_difference(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    other = dict(theirs.named_parameters())
    return max((p.grad - other[n].grad).abs().max().item() for n, p in ours.named_parameters())


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


def trl_or_skip(module: str):
    return pytest.importorskip(module, reason="TRL (the bench extra) is not installed: the parity test needs it")


def test_dpo_equals_trls_dpo_trainer(tokenizer, tmp_path):
    trl = trl_or_skip("trl")
    from datasets import Dataset

    policy, reference = tiny(0, tokenizer), tiny(1, tokenizer)
    ours_model = copy.deepcopy(policy)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, beta=0.3, use_cpu=True,
                         report_to=[], max_length=None)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(ROWS),
                             processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])  # [chosen x 3, rejected x 3]
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    with torch.no_grad():
        ref_logps, _ = PreferenceLoss(reference, "dpo", 0.3).sequence_logps(batch["input_ids"], labels,
                                                                            batch["attention_mask"])
    # Both get the same reference log-probs (TRL's own reference forward is bypassed: its precompute path reads
    # them from the batch); the policy log-probs each computes are checked equal to TRL's first.
    trainer.precompute_ref_logps = True
    theirs_batch = dict(batch, ref_chosen_logps=ref_logps[:3], ref_rejected_logps=ref_logps[3:])
    objective = PreferenceLoss(ours_model, "dpo", 0.3)
    with torch.no_grad():
        out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                     fused_lm_head=True, use_cache=False)
        trl_logps = out.log_probs[:, -(labels.shape[1] - 1):].sum(1)
        ours_logps, _ = objective.sequence_logps(batch["input_ids"], labels, batch["attention_mask"])
    assert torch.allclose(ours_logps, trl_logps, atol=1e-5)

    theirs = trainer.compute_loss(trainer.model, theirs_batch)
    theirs.backward()
    ours = objective(batch["input_ids"], labels, batch["attention_mask"], ref_logps=ref_logps)
    ours = ours / objective.count({"input_ids": batch["input_ids"], "labels": labels})
    ours.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-5
    assert abs(ours.item() - math.log(2)) > 1e-3  # the reference differs from the policy: not the trivial case
    assert max_grad_difference(ours_model, policy) <= 1e-5


def _orpo_batch(trainer, tokenizer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key: str, fill: int) -> torch.Tensor:
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)  # noqa: E731
        return torch.cat([pad(batch[f"chosen_{key}"]), pad(batch[f"rejected_{key}"])])

    return batch, both("input_ids", tokenizer.pad_token_id), both("attention_mask", 0), both("labels", IGNORE)


@pytest.mark.parametrize("prompts", ["real", "one-token"])
def test_orpo_equals_trls_orpo_trainer(tokenizer, tmp_path, prompts):
    """The odds-ratio term and its gradient equal TRL's on any prompt. TRL's NLL term also counts the prompt's
    tokens (its code: 'computed over the full prompt and response'); ours counts the answer's only, as the
    ORPO paper's L_SFT = -log P(y|x) does, so the whole loss is compared where the two agree: a prompt of one
    token, which no position predicts."""
    trl_or_skip("trl")
    from datasets import Dataset

    orpo = trl_or_skip("trl.experimental.orpo")
    rows = ROWS if prompts == "real" else [dict(r, prompt="") for r in ROWS]
    policy = tiny(0, tokenizer)
    ours_model = copy.deepcopy(policy)
    args = orpo.ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, beta=0.25, use_cpu=True,
                           report_to=[], remove_unused_columns=False)
    trainer = orpo.ORPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tokenizer)
    batch, ids, mask, labels = _orpo_batch(trainer, tokenizer)
    objective = PreferenceLoss(ours_model, "orpo", 0.25)
    parts = objective(ids, labels, mask)
    units = torch.tensor(objective.count({"input_ids": ids, "labels": labels}), dtype=torch.float32)

    forward = trainer.concatenated_forward(trainer.model, batch)
    odds_term = -trainer.odds_ratio_loss(forward[0], forward[1])[0].mean()
    assert abs((parts[0] / units[0]).item() - odds_term.item()) <= 1e-5
    odds_term.backward()
    (parts[0] / units[0]).backward(retain_graph=True)
    assert max_grad_difference(ours_model, policy) <= 1e-5
    if prompts == "one-token":
        policy.zero_grad()
        ours_model.zero_grad()
        theirs, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
        theirs.backward()
        ours = (objective(ids, labels, mask) / units).sum()
        ours.backward()
        assert abs(ours.item() - theirs.item()) <= 1e-5
        assert max_grad_difference(ours_model, policy) <= 1e-5


def test_simpo_and_label_smoothing_follow_their_formulas():
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|c| log p(c) - beta/|r| log p(r) - gamma); conservative
    DPO's label smoothing: -(1-e) log sigmoid(z) - e log sigmoid(-z). Hand-computed on fixed log-probs."""
    logps = torch.tensor([-4.0, -9.0, -6.0, -5.0])  # pairs (c=-4, r=-6) and (c=-9, r=-5)
    lengths = torch.tensor([2.0, 3.0, 4.0, 1.0])
    simpo = PreferenceLoss(torch.nn.Linear(1, 1), "simpo", beta=2.0, gamma=0.5)
    loss, chosen, rejected = simpo.terms(logps, lengths, None)
    # pair 1: 2 * (-4/2) - 2 * (-6/4) - 0.5 = -4 + 3 - 0.5 = -1.5; pair 2: 2 * (-3) - 2 * (-5) - 0.5 = 3.5
    expected = [-math.log(1 / (1 + math.exp(1.5))), -math.log(1 / (1 + math.exp(-3.5)))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([-4.0, -6.0]) and rejected.tolist() == pytest.approx([-3.0, -10.0])

    dpo = PreferenceLoss(torch.nn.Linear(1, 1), "dpo", beta=0.5, label_smoothing=0.2)
    ref = torch.tensor([-5.0, -8.0, -6.5, -6.0])
    loss, _, _ = dpo.terms(logps, lengths, ref)
    z = [0.5 * ((-4 + 5) - (-6 + 6.5)), 0.5 * ((-9 + 8) - (-5 + 6))]  # 0.25 and -1.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.tolist() == pytest.approx([-0.8 * math.log(sig(v)) - 0.2 * math.log(sig(-v)) for v in z], abs=1e-6)

    orpo = PreferenceLoss(torch.nn.Linear(1, 1), "orpo", beta=0.1)
    loss, _, _ = orpo.terms(logps, lengths, None)
    c, r = -2.0, -1.5  # mean log-probs of pair 1
    log_odds = (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
    assert loss[0].item() == pytest.approx(-0.1 * math.log(sig(log_odds)), abs=1e-6)
    x = torch.tensor([-1e-6, -0.5, -0.7, -30.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    edge = torch.tensor([0.0, -1e-12, -1e-3], requires_grad=True)  # an answer every token of which is certain
    log1mexp(edge).sum().backward()
    assert torch.isfinite(edge.grad).all()


def _pairs_batch(tokenizer, n: int, seed: int) -> dict:
    """n random pairs sharing prompts, labels on the answers only, right-padded like pad_pairs."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for _ in range(2 * n):
        prompt, answer = int(torch.randint(3, 8, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
        ids = torch.randint(5, 200, (prompt + answer,), generator=g).tolist()
        rows.append(ids)
        labels.append([IGNORE] * prompt + ids[prompt:])
    width = max(len(r) for r in rows)
    pad = lambda seq, fill: seq + [fill] * (width - len(seq))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r, tokenizer.pad_token_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
            "labels": torch.tensor([pad(lab, IGNORE) for lab in labels])}


def _halves(batch: dict) -> list[dict]:
    """The batch's pairs as two micro-batches of its first and second halves."""
    n = batch["input_ids"].shape[0] // 2
    take = lambda rows: {k: v[rows] for k, v in batch.items()}  # noqa: E731
    first, second = list(range(0, n // 2)), list(range(n // 2, n))
    return [take(first + [i + n for i in first]), take(second + [i + n for i in second])]


@pytest.mark.parametrize("kind", ["dpo", "orpo", "simpo"])
def test_a_batch_split_into_micro_batches_gives_the_same_gradient(tokenizer, kind):
    """Each component is divided by its units over the whole step (train.optimizer_step), so ORPO's per-token
    NLL and the per-pair terms do not depend on how the pairs were split into micro-batches."""
    from accelerate import Accelerator

    from instructkit.train import optimizer_step

    batch = _pairs_batch(tokenizer, 4, seed=3)
    if kind == "dpo":
        batch["ref_logps"] = torch.linspace(-30, -10, batch["input_ids"].shape[0])
    grads = []
    for group in ([batch], _halves(batch)):
        model = tiny(0, tokenizer)
        objective = PreferenceLoss(model, kind, 0.2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights; we read the grads
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        captured = {}
        optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        out = optimizer_step(Accelerator(cpu=True), objective, optimizer, scheduler, group, 0.0,
                             count=objective.count, pop_stats=objective.pop_stats)
        grads.append((captured, out))
    (one, out_one), (two, out_two) = grads
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6
    assert out_one["units"] == out_two["units"]
    loss = lambda o: sum(p / u for p, u in zip(o["loss_parts"], o["units"]))  # noqa: E731
    assert loss(out_one) == pytest.approx(loss(out_two), abs=1e-6)
    assert out_one["stats"] == pytest.approx(out_two["stats"], abs=1e-5) and out_one["stats"][0] == 4


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_a_pair_without_supervised_tokens_counts_for_nothing(tokenizer, kind):
    """The filler that evens out eval shards across processes (labels all IGNORE) adds no loss, pair or reward
    (and no NaN: ORPO's log odds of an empty answer would be log(1 - exp(0)))."""
    batch = _pairs_batch(tokenizer, 3, seed=5)
    filler = {k: v.clone() for k, v in batch.items()}
    filler["labels"][[2, 5]] = IGNORE
    objective = PreferenceLoss(tiny(0, tokenizer), kind, 2.0)
    with torch.no_grad():
        full = objective(**batch, sums=True)
        part = objective(**filler, sums=True)
        two = {k: v[[0, 1, 3, 4]] for k, v in batch.items()}
        expected = objective(**two, sums=True)
    k = 2 if kind == "orpo" else 1
    assert objective.count(filler) == (2 if kind != "orpo" else (2, objective.count(two)[1]))
    assert part[k] == 2 and full[k] == 3
    assert torch.isfinite(part).all() and torch.allclose(part, expected, atol=1e-5)


def test_nll_weight_adds_the_chosen_answers_nll_per_token(tokenizer):
    """RPO: DPO (or SimPO) plus nll_weight x the chosen answers' NLL per token, as its own component."""
    batch = _pairs_batch(tokenizer, 3, seed=7)
    batch["ref_logps"] = torch.linspace(-40, -20, 6)
    model = tiny(0, tokenizer)
    plain, rpo = PreferenceLoss(model, "dpo", 0.1), PreferenceLoss(model, "dpo", 0.1, nll_weight=0.5)
    with torch.no_grad():
        logps, lengths = plain.sequence_logps(batch["input_ids"], batch["labels"], batch["attention_mask"])
        parts = rpo(**batch)
        pairs, tokens = rpo.count(batch)
        assert (pairs, tokens) == (3, int(lengths[:3].sum())) and plain.count(batch) == 3
        assert parts[0].item() == pytest.approx(plain(**batch).item(), abs=1e-6)
        assert parts[1].item() == pytest.approx(-0.5 * logps[:3].sum().item(), rel=1e-6)
        assert rpo.eval_summary(rpo(**batch, sums=True).double())["eval_loss"] == pytest.approx(
            parts[0].item() / 3 + parts[1].item() / tokens, rel=1e-6)
