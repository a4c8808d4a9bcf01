"""Training on several processes, on the engines that exist: DDP and FSDP2 from torch.distributed,
DeepSpeed ZeRO through accelerate; and the `instructkit train --nproc N` launcher over torchrun.

The training loop stays one loop: this module only answers "which engine", wraps the model for it,
says how to skip gradient sync during accumulation, and moves tensors between sharded and full form
for checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from instructkit.checkpoint import Ranks, TrainingProgress, export_state
from instructkit.config import IGNORE, DistributedConfig, RunConfig
from instructkit.errors import user_error

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

DEEPSPEED_BUILTIN = ("zero2", "zero3", "zero3-offload")


def env_world_size() -> int:
    """Processes of this job as the launcher (torchrun, accelerate, mpirun) announced them."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def resolve_strategy(dcfg: DistributedConfig, world: int) -> str:
    """single | ddp | fsdp | deepspeed for this launch."""
    if dcfg.strategy == "deepspeed":
        return "deepspeed"
    if world == 1:
        return "single"  # sharding over one process is no sharding; nothing to synchronise
    return "ddp" if dcfg.strategy == "auto" else dcfg.strategy


def deepspeed_config_path(name: str) -> Path:
    if name in DEEPSPEED_BUILTIN:
        return Path(__file__).parent / "deepspeed" / f"{name}.json"
    return Path(name).expanduser()


def check_distributed(cfg: RunConfig, cuda: bool) -> None:
    """Refuse distributed settings this machine or launch cannot run, before anything is loaded."""
    import importlib.util

    dcfg = cfg.distributed
    if dcfg.strategy == "deepspeed":
        path = deepspeed_config_path(dcfg.deepspeed_config)
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise user_error(f"cannot read the DeepSpeed config {path} ({exc})", "distributed.deepspeed_config",
                             f"use a builtin ({', '.join(DEEPSPEED_BUILTIN)}) or a readable JSON file") from exc
        if not cuda:
            raise user_error("distributed: deepspeed needs CUDA GPUs and none is usable here",
                             "distributed.strategy", "use ddp or fsdp on CPU (fsdp shards like ZeRO-3)")
        if importlib.util.find_spec("deepspeed") is None:
            raise user_error("distributed: deepspeed needs the deepspeed package, which is not installed",
                             "distributed.strategy", "pip install deepspeed (or use fsdp)")
    if dcfg.strategy == "fsdp" and dcfg.fsdp_cpu_offload and not cuda:
        raise user_error("distributed.fsdp_cpu_offload moves GPU state into CPU memory and needs CUDA GPUs",
                         "distributed.fsdp_cpu_offload", "set it to false on a CPU machine (all state is in CPU "
                         "memory there already)")
    if dcfg.strategy == "fsdp" and cfg.model.precision == "fp16":
        raise user_error("FSDP with fp16 needs a sharded gradient scaler that instructkit does not set up",
                         "model.precision", "use bf16 (or fp32) with distributed: fsdp")


def make_accelerator(mixed_precision: str, strategy: str, cfg: RunConfig) -> Accelerator:
    """An Accelerator for this run: the process group (gloo on CPU, NCCL on GPUs) with the configured
    timeout, and the DeepSpeed plugin when asked. accelerate keeps one AcceleratorState per process;
    a second `train()` in the same process (a notebook) may need another precision, so the earlier
    state is dropped. PartialState, which holds the process group, is kept."""
    import torch
    from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:  # no public API for this; used only when a previous run left state
        AcceleratorState._reset_state(reset_partial_state=False)
    kwargs = {"kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.ddp_timeout))],
              # accelerate treats a launch on CPUs as distributed only when told it runs on CPUs
              "cpu": not torch.cuda.is_available(),
              # FSDP2 casts with its own mixed-precision policy; autocast on top would only cost time
              "mixed_precision": "no" if strategy == "fsdp" else mixed_precision}
    if strategy == "deepspeed":
        plugin = DeepSpeedPlugin(hf_ds_config=str(deepspeed_config_path(cfg.distributed.deepspeed_config)),
                                 gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                                 gradient_clipping=cfg.train.max_grad_norm)
        # accelerate fills "auto" batch sizes from a prepared DataLoader; ours is not prepared (the
        # sampler shards it), so they are given here.
        tc = cfg.train
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tc.per_device_train_batch_size
        plugin.deepspeed_config["train_batch_size"] = (tc.per_device_train_batch_size * tc.gradient_accumulation_steps
                                                       * env_world_size())
        kwargs["deepspeed_plugin"] = plugin
    return Accelerator(**kwargs)


def shard_fsdp(loss_fn: torch.nn.Module, model: torch.nn.Module, dcfg: DistributedConfig, compute_dtype: str,
               device: torch.device | str) -> None:
    """FSDP2 in place: each decoder layer one unit, the loss module (embeddings, final norm, head) the
    root, so every parameter is gathered exactly while its unit runs. Full sharding over all
    processes, or hybrid: sharded within a node and replicated across nodes."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if dcfg.fsdp_sharding == "hybrid" and world > local:
        mesh = init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    dtype = getattr(torch, compute_dtype)
    mixed = dtype != torch.float32
    kwargs = {"mesh": mesh,
              "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
              if mixed else MixedPrecisionPolicy(),
              "offload_policy": CPUOffloadPolicy() if dcfg.fsdp_cpu_offload else OffloadPolicy()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_types = set(getattr(base, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, **kwargs)
    fully_shard(loss_fn, **kwargs)


@contextmanager
def no_sync(module: torch.nn.Module, skip: bool) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce) when `skip`: DDP's no_sync, FSDP2's
    set_requires_gradient_sync; a single process has nothing to skip."""
    if not skip:
        yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with module.no_sync() if hasattr(module, "no_sync") else nullcontext():
            yield


def ranks_of(accelerator: Accelerator, sharded: bool) -> Ranks:
    """What checkpoint code needs to know about the processes, without importing accelerate."""
    import torch.distributed as dist

    def gather(obj):
        if accelerator.num_processes == 1:
            return [obj]
        out = [None] * accelerator.num_processes
        dist.all_gather_object(out, obj)
        return out

    return Ranks(rank=accelerator.process_index, world=accelerator.num_processes, sharded=sharded,
                 barrier=accelerator.wait_for_everyone, gather=gather)


def check_resume_world(state: TrainingProgress, world: int, global_batch: int, checkpoint: Path) -> str | None:
    """None when a checkpoint written by `state.world_size` processes can resume on `world`; a note
    when it can with a caveat; UserError when it cannot."""
    saved = state.world_size
    if saved == world:
        return None
    fix = f"resume with --nproc {saved} (the world size that wrote it)"
    if state.sharded:
        raise user_error(f"the checkpoint {checkpoint} holds parameters sharded over {saved} processes and this "
                         f"launch has {world}", "distributed.fsdp_state_dict", fix)
    if state.global_batch != global_batch or state.batch_in_epoch != 0:
        raise user_error(
            f"the checkpoint {checkpoint} was written by {saved} process(es) (global batch "
            f"{state.global_batch}) and this launch has {world} (global batch {global_batch}): the data "
            "position inside an epoch and the batch size would not carry over", "train.resume",
            f"{fix}; a different world size can resume only at an epoch boundary (save_strategy: epoch) with "
            "the same global batch (per_device_train_batch_size x gradient_accumulation_steps x processes)")
    return (f"resuming {saved}-process checkpoint on {world} processes at an epoch boundary with the same global "
            "batch; dropout RNG streams of the new processes start fresh, so the result is not bit-identical")


def leave_process_group() -> None:
    """Tear down the process group once the run is done, every rank together. A rank that left while rank 0
    was still saving final/ could abort on its way out (SIGABRT, "terminate called without an active
    exception", seen in 2 of 4 full suite runs on 2 cores), failing a job whose work was complete; so
    all ranks first wait for each other, then destroy the group before interpreter shutdown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def eval_shard(examples: list, rank: int, world: int) -> list:
    """This process's share of the eval set. Every process gets the same number of examples (a sharded
    model runs its forward passes together), the missing ones filled with an unsupervised copy that
    adds nothing to the loss; nothing is counted twice."""
    mine = examples[rank::world]
    filler = _unsupervised(examples[0]) if examples else None
    return mine + [filler] * (math.ceil(len(examples) / world) - len(mine))


def _unsupervised(example):
    """A copy that no loss counts: an example without labels, or a pair with neither side's (the preference
    losses skip such pairs)."""
    if hasattr(example, "chosen"):
        return replace(example, chosen=_unsupervised(example.chosen), rejected=_unsupervised(example.rejected))
    return replace(example, labels=[IGNORE] * len(example.labels))


def agreed_signal(signum: int | None, accelerator: Accelerator) -> int | None:
    """The stop signal as all processes agree on it after a step: a signal may reach one rank a step
    before another, and they must checkpoint at the same step (a checkpoint is collective)."""
    if accelerator.num_processes == 1:
        return signum
    import torch

    agreed = accelerator.reduce(torch.tensor(signum or 0, device=accelerator.device), "max").item()
    return int(agreed) or None


def full_weights(model: torch.nn.Module, loss_fn: torch.nn.Module, strategy: str,
                 accelerator: Accelerator) -> dict | None:
    """The whole model's weights where the model holds only shards (every process must call this), for
    `final/`; None where the model itself is whole."""
    if strategy == "fsdp":
        return export_state(model.state_dict())
    if strategy == "deepspeed":
        state = accelerator.get_state_dict(loss_fn)  # gathers ZeRO-3 partitions
        return {k.removeprefix("model."): v for k, v in state.items()}
    return None


EXIT_DIR_ENV = "INSTRUCTKIT_EXIT_DIR"  # where each worker of `train --nproc` records its exit code


def launch_command(config: str, global_flags: list[str], passthrough: list[str], nproc: int, nnodes: int = 1,
                   node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 29500) -> list[str]:
    """torchrun running this CLI on `nproc` processes per node (the same as `torchrun ... -m instructkit`).
    With --node-rank the rendezvous is static, so ranks are node_rank * nproc + local rank."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
            f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}",
            "-m", "instructkit", *global_flags, "train", config, *passthrough]


def launch_job(cfg: RunConfig, config: str, global_flags: list[str], passthrough: list[str], nproc: int,
               nnodes: int, node_rank: int, master_addr: str, master_port: int) -> int:
    """`instructkit train --nproc`: refuse what this machine cannot run (exit 2 before any process
    starts), then run torchrun and return the job's exit code."""
    import torch

    from instructkit.models import check_runtime

    check_runtime(cfg.model)
    check_distributed(cfg, torch.cuda.is_available())
    command = launch_command(config, global_flags, passthrough, nproc, nnodes, node_rank, master_addr, master_port)
    print(f"launching: {' '.join(command)}", flush=True)
    return launch(command, nproc, node_rank)


def record_exit(code: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    Path(os.environ[EXIT_DIR_ENV], f"rank-{rank:05d}").write_text(str(code))


def launch(command: list[str], nproc: int, node_rank: int = 0) -> int:
    """Run torchrun and return one exit code for the job: 2 when a rank stopped on bad input, 130/143
    when stopped by a signal, 1 when a rank failed or died (named), 0 when all ranks finished.
    Ctrl-C reaches the workers through the process group (each checkpoints and stops); SIGTERM is
    passed on. Each worker gets its share of the CPU threads (torchrun would set 1)."""
    import signal
    import tempfile

    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    signalled: list[int] = []

    def forward(signum, _frame):
        signalled.append(signum)
        proc.send_signal(signum)

    with tempfile.TemporaryDirectory(prefix="instructkit-exit-") as exits:
        proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": threads, EXIT_DIR_ENV: exits})
        previous = signal.signal(signal.SIGTERM, forward)
        try:
            while proc.poll() is None:
                try:
                    proc.wait()
                except KeyboardInterrupt:  # the workers got the same Ctrl-C from the terminal; wait for them
                    signalled.append(signal.SIGINT)
        finally:
            signal.signal(signal.SIGTERM, previous)
        codes = {int(f.name.split("-")[1]): int(f.read_text() or 1) for f in Path(exits).iterdir()}
    return job_exit_code(proc.returncode, codes, range(node_rank * nproc, (node_rank + 1) * nproc), signalled)


def job_exit_code(launcher_code: int, codes: dict[int, int], ranks: list[int], signalled: list[int]) -> int:
    """The job's exit code from torchrun's and each local rank's, with a message naming failed ranks."""
    missing = [r for r in ranks if r not in codes]
    failed = {r: c for r, c in codes.items() if c not in (0, 130, 143)}
    if launcher_code == 0 and not missing and not failed:
        return 0
    if any(c == 2 for c in codes.values()):
        print(f"error: rank(s) {sorted(r for r, c in codes.items() if c == 2)} stopped on bad input "
              "(the message is above); fix it and run the same command again", file=sys.stderr)
        return 2
    if signalled and not failed:
        return 130 if signalled[0] == 2 else 128 + signalled[0]
    stops = [codes[r] for r in ranks if codes.get(r) in (130, 143)]
    if stops and not missing and not failed:  # every rank stopped on a signal this process did not see (it
        return stops[0]                       # reached torchrun's agent first, which then exits 1)
    parts = []
    if missing:
        why = "killed by a signal, e.g. out of memory" + ("; when one dies, torchrun kills the others that do not "
                                                        "stop in time" if len(missing) > 1 else "")
        parts.append(f"rank(s) {missing} died without an exit code ({why})")
    if failed:
        parts.append(", ".join(f"rank {r} exited with {c}" for r, c in sorted(failed.items())))
    print(f"error: the distributed job failed: {'; '.join(parts) or f'torchrun exited with {launcher_code}'}; "
          "the other ranks were stopped. Complete checkpoints are kept: run the same command again to resume.",
          file=sys.stderr)
    return 1
