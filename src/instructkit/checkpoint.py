"""Checkpoints: `checkpoints/step-NNNNNN/` written beside, renamed into place, COMPLETE marker last.

A checkpoint holds everything that decides the rest of the run: the trainable weights (the adapter,
or the whole model), optimizer and scheduler state, the RNG states (python, numpy, torch CPU and
CUDA) and the data position. Tensors are safetensors and everything else JSON, so loading a
checkpoint never unpickles anything.

With several processes, parameters and optimizer state are either gathered into full tensors that
rank 0 writes, or (FSDP, `fsdp_state_dict: sharded`) written by each rank as its own shard; the RNG
states of all ranks are gathered into rank 0's files either way.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from instructkit.errors import user_error
from instructkit.files import atomic_path

if TYPE_CHECKING:
    import torch

COMPLETE = "COMPLETE"
PREFIX = "step-"
SHARED_FILES = ("optimizer.json", "scheduler.json", "rng.json", "rng.safetensors", "state.json")
RANK_FILES = ("trainable", "optimizer")  # .safetensors, or .rankNNNNN.safetensors when sharded


class TrainingProgress(BaseModel):
    """Where a run stands, as a checkpoint's state.json stores it. Read back strictly, like a config: a
    hand-edited or damaged file is refused with its reason instead of steering the resumed run."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    step: int = Field(ge=0)
    epoch_index: int = Field(ge=0)
    batch_in_epoch: int = Field(ge=0)  # micro-batches of this process done in the epoch
    epoch: float = Field(ge=0)
    total_steps: int = Field(ge=1)
    seed: int
    global_batch: int = Field(ge=1)
    world_size: int = Field(1, ge=1, le=65536)  # a bound: verifying lists one file per rank
    sharded: bool = False
    # The best-checkpoint tracker (selection.Tracker): best value of its metric, its step, evaluations since.
    best_value: float | None = None
    best_step: int | None = Field(None, ge=0)
    evals_since_best: int = Field(0, ge=0)
    best_tie_loss: float | None = None
    held_step: int | None = Field(None, ge=0)


def read_progress(path: Path) -> TrainingProgress:
    """The checkpoint's state.json, validated; ValueError saying what is wrong (OSError when unreadable)."""
    try:
        return TrainingProgress.model_validate_json((path / "state.json").read_bytes())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()[:3])
        raise ValueError(f"state.json is not valid ({problems})") from None


@dataclass
class Ranks:
    """The processes that write and read a checkpoint together (one, unless launched distributed)."""

    rank: int = 0
    world: int = 1
    sharded: bool = False  # each rank stores its own shard of (FSDP) parameters and optimizer state
    barrier: Callable[[], None] = lambda: None
    gather: Callable[[Any], list] = lambda obj: [obj]  # every rank's object, on every rank

    @property
    def main(self) -> bool:
        return self.rank == 0


def _rank_file(stem: str, rank: int, sharded: bool) -> str:
    return f"{stem}.rank{rank:05d}.safetensors" if sharded else f"{stem}.safetensors"


def _is_dtensor(tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _export(tensor, sharded: bool):
    """A tensor as stored: this rank's shard, or the full tensor (gathering is collective: every rank
    calls this for the same tensors in the same order)."""
    if _is_dtensor(tensor):
        tensor = tensor.to_local() if sharded else tensor.full_tensor()
    return tensor.detach().contiguous().cpu()


def export_state(state: dict, sharded: bool = False) -> dict:
    """A state dict with every tensor stored as `_export` stores it (collective under FSDP when full)."""
    return {k: _export(v, sharded) for k, v in state.items()}


def import_tensor(saved, like, sharded: bool):
    """A stored tensor in the form of `like`: a plain tensor, or a DTensor placed like it (each rank
    takes its own part of a full tensor locally, without communication)."""
    if not _is_dtensor(like):
        return saved
    from torch.distributed.tensor import DTensor, distribute_tensor

    saved = saved.to(like.device)
    if sharded:
        return DTensor.from_local(saved, like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())
    return distribute_tensor(saved, like.device_mesh, like.placements, src_data_rank=None)


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def optimizer_to_files(state: dict, sharded: bool = False) -> tuple[dict, dict]:
    """Split an optimizer state dict into flat tensors (safetensors) and a JSON-able remainder."""
    import torch

    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = _export(value, sharded)
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_to_files() -> tuple[dict, dict]:
    """Every RNG whose state decides what comes next: python, numpy, torch CPU and each CUDA device."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict, rank: int = 0) -> None:
    """This rank's RNG states from a checkpoint's gathered ones (a rank the checkpoint did not have, after
    a permitted change of world size, keeps its fresh seeding)."""
    import numpy as np
    import torch

    if rank >= len(meta["ranks"]):
        return
    meta = meta["ranks"][rank]
    tensors = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(rank)}
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def trainable_state(model: torch.nn.Module, sharded: bool = False) -> dict:
    """The parameters that training changes (shared/tied ones once), detached on CPU: full tensors
    (collective under FSDP), or this rank's shards."""
    return {n: _export(p, sharded) for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: TrainingProgress, keep: int | None,
                    ranks: Ranks | None = None) -> Path | None:
    """Write one complete checkpoint atomically, then prune old ones (never the newest complete).
    Every rank calls it; rank 0 renames it into place and returns its path (others get None).

    A full disk or an unwritable directory leaves every earlier checkpoint as it was and raises a
    UserError that says so."""
    from safetensors.torch import save_file

    ranks = ranks or Ranks()
    root = run_dir / "checkpoints"
    final, tmp_name = root / step_dir_name(step), f".{step_dir_name(step)}.tmp"  # one name: every rank writes in it
    weights = trainable_state(model, ranks.sharded)
    tensors, meta = optimizer_to_files(optimizer.state_dict(), ranks.sharded)
    rng = ranks.gather(rng_to_files())
    progress = progress.model_copy(update={"world_size": ranks.world, "sharded": ranks.sharded})
    try:
        with atomic_path(final, tmp_name) if ranks.main else nullcontext(root / tmp_name) as tmp:
            if ranks.main:
                tmp.mkdir(parents=True)
            ranks.barrier()
            if ranks.main or ranks.sharded:
                save_file(weights, str(tmp / _rank_file("trainable", ranks.rank, ranks.sharded)))
                save_file(tensors, str(tmp / _rank_file("optimizer", ranks.rank, ranks.sharded)))
            if ranks.main:
                (tmp / "optimizer.json").write_text(json.dumps(meta))
                (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=lambda o: None))
                save_file({f"{r}.{k}": v for r, (t, _) in enumerate(rng) for k, v in t.items()},
                          str(tmp / "rng.safetensors"))
                (tmp / "rng.json").write_text(json.dumps({"ranks": [m for _, m in rng]}))
                (tmp / "state.json").write_text(progress.model_dump_json(indent=2))
            ranks.barrier()
            if not ranks.main:
                return None
            _fsync_tree(tmp)
        with open(final / COMPLETE, "w") as handle:  # written last: a checkpoint without it is incomplete
            handle.write(str(step))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise user_error(f"cannot write the checkpoint of step {step} in {root} "
                         f"({'the disk is full' if full else exc.strerror or exc}); earlier checkpoints are intact",
                         "output_dir", "free space or choose an output_dir on another disk, then run the same "
                         "command again to resume") from exc
    if keep is not None:
        prune_checkpoints(root, keep)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with a COMPLETE marker, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint cannot be loaded, or None when every file is there and readable."""
    from safetensors import safe_open

    if not (path / COMPLETE).is_file():
        return "it has no COMPLETE marker (it was being written when the run stopped)"
    try:
        progress = read_progress(path)
    except OSError as exc:
        return f"state.json is unreadable ({type(exc).__name__})"
    except ValueError as exc:
        return str(exc)
    sharded, world = progress.sharded, progress.world_size
    rank_files = [_rank_file(stem, r, sharded) for stem in RANK_FILES for r in range(world if sharded else 1)]
    for name in [*rank_files, *SHARED_FILES]:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(file), "pt") as handle:
                    for key in handle.keys():
                        handle.get_tensor(key)
            else:
                json.loads(file.read_text())
        except Exception as exc:  # noqa: BLE001 - any failure to read means "corrupted"
            return f"{name} is unreadable ({type(exc).__name__})"
    return None


def find_resumable(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a warning for each newer one that was skipped."""
    warnings = []
    if root.is_dir():
        warnings += [f"ignoring {p.name}: it has no COMPLETE marker" for p in sorted(root.iterdir())
                     if p.name.startswith((PREFIX, f".{PREFIX}")) and not (p / COMPLETE).is_file()]
    for path in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, warnings
        warnings.append(f"ignoring {path.name}: {problem}")
    return None, warnings


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int = 0) -> TrainingProgress:
    """Restore weights, optimizer, scheduler and this rank's RNG from a checkpoint (into plain or
    FSDP-sharded parameters); returns where the run stood."""
    import torch
    from safetensors.torch import load_file

    state = read_progress(path)
    sharded = state.sharded
    weights = load_file(str(path / _rank_file("trainable", rank, sharded)))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise user_error(f"the checkpoint {path} does not match this model (missing {missing[:3]}, unexpected "
                         f"{sorted(set(weights) - set(params))[:3]})", "train.resume",
                         "resume with the model and method the checkpoint was trained with")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(import_tensor(tensor, params[name], sharded))
    opt_state = optimizer_from_files(load_file(str(path / _rank_file("optimizer", rank, sharded))),
                                     json.loads((path / "optimizer.json").read_text()))
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # moments, shaped like their parameter
                per_param[key] = import_tensor(value, by_index[index], sharded)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    restore_rng(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()), rank)
    return state


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (at least one is always kept)."""
    complete = complete_checkpoints(root)
    for old in complete[: max(len(complete) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
