import torch

from instructkit.checkpoint import (COMPLETE, complete_checkpoints, optimizer_from_files, optimizer_to_files,
                                    prune_checkpoints, step_dir_name)
from instructkit.evaluate import accuracy_table, exact_match, normalize


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


def test_accuracy_table_per_task():
    rows = [{"task": "a", "reference": "x", "out": "X"}, {"task": "a", "reference": "y", "out": "z"},
            {"task": "b", "reference": "q", "out": "q"}]
    table = accuracy_table(rows, "out")
    assert table == {"exact_match": 2 / 3, "n": 3, "per_task": {"a": 0.5, "b": 1.0}}
