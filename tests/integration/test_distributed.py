"""Several processes on CPUs (gloo): DDP and FSDP2 train exactly like one process with the same global
batch, two "nodes" on 127.0.0.1 train together, a dead rank ends the job, and a killed job resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from instructkit.metrics import read_metrics
from tests.conftest import ROWS, free_port, write_jsonl

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo launches are tested on Linux")


def launch(config: Path, *args: str, nproc: int = 2, wait: bool = True, **popen):
    command = [sys.executable, "-m", "instructkit", "train", str(config), *args]
    if nproc:
        command += ["--nproc", str(nproc), "--master-port", str(popen.pop("port", free_port()))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def weights(run: Path) -> dict:
    return load_file(str(next((run / "final").glob("*.safetensors"))))


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


@pytest.fixture
def config(tiny_config, tmp_path):
    """16 rows; global batch 8 either as 1 process x batch 4 x accumulation 2 or 2 processes x batch 4."""
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS * 2)

    def make(name: str, world: int, **train):
        path = tiny_config(output_dir=str(tmp_path / name), data={"train_file": str(data)},
                           train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2 // world,
                                  "max_steps": 4, **train})
        return path.rename(tmp_path / f"{name}.yaml")

    return make




def assert_same_training(one: Path, two: Path, tol: float = 1e-5) -> None:
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= tol, (a, b)
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= tol


@pytest.mark.parametrize("strategy,method", [("ddp", "lora"), ("fsdp", "full")])
def test_two_processes_train_like_one_with_the_same_global_batch(config, tmp_path, strategy, method):
    one = config("one", 1)
    code, out = launch(one, f"method={method}", nproc=0)
    assert code == 0, out
    two = config("two", 2)
    code, out = launch(two, f"method={method}", f"distributed={strategy}")
    assert code == 0, out
    assert f"x 2 process(es) = global batch 8 ({strategy})" in out
    assert out.count("run directory:") == 1  # rank 0 reports, once
    assert_same_training(tmp_path / "one", tmp_path / "two")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["distributed"] == {"strategy": strategy, "world_size": 2, "global_batch": 8}


@pytest.mark.parametrize("engine", [[], ["distributed.strategy=fsdp", "distributed.fsdp_sharding=hybrid",
                                         "train.save_strategy=steps", "train.save_steps=2"]], ids=["ddp", "hsdp"])
def test_two_nodes_on_localhost_train_and_save(config, tmp_path, engine):
    """Hybrid FSDP over two one-process nodes: replicated across nodes, sharded within each."""
    cfg = config("nodes", 2)
    port = str(free_port())
    nodes = [launch(cfg, "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank), "--master-port", port,
                    *engine, nproc=0, wait=False) for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results
    assert f"x 2 process(es) = global batch 8 ({'fsdp' if engine else 'ddp'})" in results[0][0]
    assert (tmp_path / "nodes" / "final" / "adapter_model.safetensors").is_file()
    assert len(losses(tmp_path / "nodes")) == 4


def _workers(launcher: subprocess.Popen) -> dict:
    import psutil

    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "instructkit" in " ".join(child.cmdline()) and "RANK" in child.environ():
                found[int(child.environ()["RANK"])] = child
        except psutil.Error:
            pass
    return found


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while len(losses(run)) < n:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_dead_rank_ends_the_job_with_its_name(config, tmp_path):
    proc = launch(config("dead", 2, max_steps=100000, save_strategy="no"), wait=False)
    _wait_for_steps(tmp_path / "dead", 2, proc)
    workers = _workers(proc)
    assert sorted(workers) == [0, 1]
    killed = time.time()
    workers[1].kill()
    out, _ = proc.communicate(timeout=90)
    assert time.time() - killed < 60
    assert proc.returncode == 1, out
    # rank 0, killed by torchrun when it does not stop in time (blocked in a collective on a slow machine), is
    # named beside it
    dead = re.search(r"rank\(s\) \[([\d, ]+)\] died without an exit code", out)
    assert dead and 1 in [int(r) for r in dead.group(1).split(",")], out


@pytest.mark.parametrize("engine", [[], ["distributed.strategy=fsdp", "distributed.fsdp_state_dict=sharded",
                                         "method=full"]], ids=["ddp", "fsdp-sharded"])
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(config, tmp_path, engine):
    # 16 steps after the kill point: ample margin for the kill, half the checkpoints of the 40 steps it had
    steps = dict(max_steps=20, save_strategy="steps", save_steps=1, save_total_limit=None)
    code, out = launch(config("whole", 2, **steps), *engine)
    assert code == 0, out
    cfg = config("killed", 2, **steps)
    proc = launch(cfg, *engine, wait=False, start_new_session=True)
    _wait_for_steps(tmp_path / "killed", 4, proc)
    workers = _workers(proc).values()  # torchrun starts each worker in a session of its own
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job at once, as a lost machine would
    for worker in workers:
        worker.kill()
    proc.communicate(timeout=60)
    assert not (tmp_path / "killed" / "final").exists(), "the run ended before it could be killed"
    code, out = launch(cfg, *engine)
    assert code == 0 and "resumed from" in out, out
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert all((a[k] == b[k]).all() for k in a)


def test_ctrl_c_stops_every_rank_at_one_checkpoint(config, tmp_path):
    """Ctrl-C reaches the launcher's process group; torchrun passes it on, the ranks agree on the step,
    write one checkpoint together and the job exits 130; the same command resumes from it."""
    cfg = config("stopped", 2, max_steps=100000, save_strategy="no")
    proc = launch(cfg, wait=False, start_new_session=True)
    _wait_for_steps(tmp_path / "stopped", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, out
    from instructkit.checkpoint import complete_checkpoints, verify_checkpoint

    (checkpoint,) = complete_checkpoints(tmp_path / "stopped" / "checkpoints")
    assert verify_checkpoint(checkpoint) is None
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["world_size"] == 2 and json.loads((checkpoint / "rng.json").read_text())["ranks"][1]
    code, out = launch(cfg, "train.max_steps=" + str(state["step"] + 2), "--allow-config-change")
    assert code == 0 and f"resumed from {checkpoint}" in out, out


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_readme_launchers_run_two_processes(config, tmp_path, launcher):
    cfg = config(launcher, 2)
    port = str(free_port())
    prefix = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={port}"],
              "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                             "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                             f"--main_process_port={port}"]}[launcher]
    out = subprocess.run([*prefix, "-m", "instructkit", "train", str(cfg)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "x 2 process(es) = global batch 8 (ddp)" in out.stdout
    assert len(losses(tmp_path / launcher)) == 4


def test_bad_input_is_refused_before_any_process_starts(config, tmp_path, capsys):
    from instructkit.cli import main

    cfg = config("refused", 2)
    started = time.time()
    assert main(["train", str(cfg), "--nproc", "2", "distributed=deepspeed"]) == 2  # needs save_strategy: no
    assert main(["train", str(cfg), "--nproc", "2", "distributed.strategy=fsdp",
                 "distributed.fsdp_cpu_offload=true"]) == 2  # needs CUDA
    err = capsys.readouterr().err
    assert "deepspeed needs CUDA GPUs" in err and "fsdp_cpu_offload" in err and "launching" not in err
    assert time.time() - started < 30 and not (tmp_path / "refused").exists()
