import pytest
import torch

from instructkit.checkpoint import (COMPLETE, complete_checkpoints, optimizer_from_files, optimizer_to_files,
                                    prune_checkpoints, step_dir_name)
from instructkit.evaluate import difference, exact_match, normalize, rouge_l, score


def test_optimizer_state_round_trips_without_pickle():
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    tensors, meta = optimizer_to_files(opt.state_dict())
    restored = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=0.5)
    restored.load_state_dict(optimizer_from_files(tensors, meta))
    assert restored.param_groups[0]["lr"] == 0.1
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_prune_keeps_newest_complete(tmp_path):
    for step in (10, 20, 30):
        d = tmp_path / step_dir_name(step)
        d.mkdir()
        (d / COMPLETE).write_text(str(step))
    (tmp_path / step_dir_name(40)).mkdir()  # incomplete: never counted, never kept as "newest"
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000030"]


def test_exact_match_normalisation():
    assert normalize("  The  Answer.\n") == "the answer"
    assert exact_match('"Positive"', "positive")
    assert exact_match("2021-03-05.", "2021-03-05")
    assert not exact_match("The sentiment is positive", "positive")


def test_rouge_l_by_hand():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5 tokens: P = 5/5, R = 5/6, F = 2PR/(P+R)
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l("positive", "positive") == 1.0 and rouge_l("negative", "positive") == 0.0


def test_score_and_difference_per_task():
    rows = [{"task": "a", "reference": "x y", "out": "X y"}, {"task": "a", "reference": "y", "out": "z"},
            {"task": "b", "reference": "q", "out": "q"}]
    tuned = score(rows, "out", loss=0.5)
    assert tuned["n"] == 3 and tuned["exact_match"] == pytest.approx(2 / 3) and tuned["rouge_l"] == pytest.approx(2 / 3)
    assert tuned["perplexity"] == pytest.approx(1.6487212707)
    assert tuned["per_task"] == {"a": {"n": 2, "exact_match": 0.5, "rouge_l": 0.5}, "b": {"n": 1, "exact_match": 1.0,
                                                                                        "rouge_l": 1.0}}
    base = score([{**r, "out": "nothing"} for r in rows], "out", loss=1.0)
    diff = difference(tuned, base)
    assert diff["loss"] == -0.5 and diff["per_task"]["b"]["exact_match"] == 1.0


def test_tied_embeddings_save_and_load_once_and_stay_tied(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructkit.checkpoint import TrainingProgress, load_checkpoint, save_checkpoint, verify_checkpoint

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    trained = LlamaForCausalLM(cfg)
    assert trained.lm_head.weight is trained.model.embed_tokens.weight
    opt = torch.optim.AdamW(trained.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trained(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    path = save_checkpoint(tmp_path, 1, trained, opt, sched, TrainingProgress(
        step=1, epoch_index=0, batch_in_epoch=1, epoch=1.0, total_steps=1, seed=0, global_batch=1), keep=None)
    assert verify_checkpoint(path) is None
    from safetensors import safe_open

    with safe_open(str(path / "trainable.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # the shared tensor once

    torch.manual_seed(1)
    fresh = LlamaForCausalLM(cfg)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    load_checkpoint(path, fresh, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


# A hand-edited state.json of each kind is refused with its reason (the resume test runs one kind end to end).
@pytest.mark.parametrize("tamper", [{"world_size": "abc"}, {"batch_in_epoch": -1}, {"world_size": 10**9},
                                    {"step": None}], ids=["type", "negative", "huge", "missing"])
def test_read_progress_refuses_a_tampered_state(tmp_path, tamper):
    import json

    from instructkit.checkpoint import TrainingProgress, read_progress

    state = TrainingProgress(step=3, epoch_index=0, batch_in_epoch=3, epoch=0.5, total_steps=6, seed=1,
                             global_batch=2).model_dump()
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert read_progress(tmp_path).step == 3
    state.update(tamper)
    (tmp_path / "state.json").write_text(json.dumps({k: v for k, v in state.items() if v is not None}))
    with pytest.raises(ValueError, match=f"state.json is not valid \\({next(iter(tamper))}: "):
        read_progress(tmp_path)
