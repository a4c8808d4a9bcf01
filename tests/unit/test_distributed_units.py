"""The pieces of distributed training that need no second process."""

import json
from pathlib import Path

import pytest

from instructkit.config import RunConfig
from instructkit.data.tokenize import IGNORE, Example
from instructkit.distributed import (DEEPSPEED_BUILTIN, check_distributed, check_resume_world, deepspeed_config_path,
                                     eval_shard, job_exit_code, launch_command, resolve_strategy)
from instructkit.errors import UserError


def config(**extra) -> RunConfig:
    return RunConfig.model_validate({"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"}, **extra})


def test_strategy_shorthand_and_resolution():
    assert config(distributed="fsdp").distributed.strategy == "fsdp"
    assert resolve_strategy(config().distributed, 1) == "single"
    assert resolve_strategy(config().distributed, 4) == "ddp"
    assert resolve_strategy(config(distributed="fsdp").distributed, 4) == "fsdp"
    with pytest.raises(ValueError, match="save_strategy: no"):
        config(distributed="deepspeed")


def test_deepspeed_is_refused_without_cuda_and_ships_its_configs():
    cfg = config(distributed="deepspeed", train={"save_strategy": "no"})
    with pytest.raises(UserError, match="needs CUDA GPUs"):
        check_distributed(cfg, cuda=False)
    stages = {name: json.loads(deepspeed_config_path(name).read_text())["zero_optimization"]
              for name in DEEPSPEED_BUILTIN}
    assert stages["zero2"]["stage"] == 2 and stages["zero3"]["stage"] == 3
    assert stages["zero3-offload"]["offload_optimizer"]["device"] == "cpu"
    bad = config(distributed={"strategy": "deepspeed", "deepspeed_config": "/nonexistent.json"},
                 train={"save_strategy": "no"})
    with pytest.raises(UserError, match="cannot read the DeepSpeed config"):
        check_distributed(bad, cuda=True)
    with pytest.raises(UserError, match="needs CUDA GPUs"):
        check_distributed(config(distributed={"strategy": "fsdp", "fsdp_cpu_offload": True}), cuda=False)
    with pytest.raises(UserError, match="use bf16"):
        check_distributed(config(distributed="fsdp", model={"name_or_path": "m", "precision": "fp16"}), cuda=True)


def test_resume_on_another_world_size_is_refused_unless_the_state_allows_it(tmp_path):
    from instructkit.checkpoint import TrainingProgress

    def state(**changes):
        return TrainingProgress(**{"step": 3, "epoch_index": 0, "epoch": 0.5, "total_steps": 9, "seed": 1,
                                   "world_size": 2, "global_batch": 8, "batch_in_epoch": 3, **changes})

    assert check_resume_world(state(), 2, 8, tmp_path) is None
    with pytest.raises(UserError, match="--nproc 2"):
        check_resume_world(state(), 4, 8, tmp_path)  # mid-epoch
    with pytest.raises(UserError, match="global batch"):
        check_resume_world(state(batch_in_epoch=0), 4, 16, tmp_path)
    assert "epoch boundary" in check_resume_world(state(batch_in_epoch=0), 1, 8, tmp_path)
    with pytest.raises(UserError, match="sharded over 2"):
        check_resume_world(state(batch_in_epoch=0, sharded=True), 1, 8, tmp_path)


def test_eval_shards_are_equal_in_length_and_count_every_example_once():
    examples = [Example([1, 2, i], [IGNORE, 2, i]) for i in range(5)]
    shards = [eval_shard(examples, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    supervised = [e for s in shards for e in s if e.n_supervised]
    assert sorted(e.input_ids[2] for e in supervised) == [0, 1, 2, 3, 4]


def test_job_exit_code_names_failed_ranks(capsys):
    assert job_exit_code(0, {0: 0, 1: 0}, range(2), []) == 0
    assert job_exit_code(1, {0: 1}, range(2), []) == 1
    assert "rank(s) [1] died without an exit code" in capsys.readouterr().err
    assert job_exit_code(1, {0: 2, 1: 2}, range(2), []) == 2
    assert job_exit_code(1, {0: 130, 1: 130}, range(2), [2]) == 130
    assert job_exit_code(1, {0: 143, 1: 143}, range(2), [15]) == 143
    # every rank stopped on SIGINT, which reached torchrun's agent (exit 1) before this process saw it
    assert job_exit_code(1, {0: 130, 1: 130}, range(2), []) == 130
    assert job_exit_code(1, {0: 130}, range(2), []) == 1  # rank 1 died without a code
    assert job_exit_code(1, {}, range(2), []) == 1  # one died; torchrun killed the other, which did not stop in time
    assert "rank(s) [0, 1] died without an exit code" in capsys.readouterr().err


def test_launch_command_runs_this_cli_through_torchrun():
    command = launch_command("c.yaml", ["--debug"], ["a=1", "--overwrite"], 4, 2, 1, "10.0.0.1", 29400)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in command and "--nnodes=2" in command and "--node-rank=1" in command
    assert command[-6:] == ["instructkit", "--debug", "train", "c.yaml", "a=1", "--overwrite"]


def test_builtin_deepspeed_configs_are_package_data():
    import tomllib

    root = Path(__file__).parents[2] / "pyproject.toml"
    data = tomllib.loads(root.read_text())["tool"]["setuptools"]["package-data"]["instructkit"]
    assert "deepspeed/*.json" in data
