"""Checkpoints: `checkpoints/step-NNNNNN/` written beside, renamed into place, COMPLETE marker last.

Weights go through `save_pretrained` (safetensors: the adapter for LoRA, the model otherwise);
optimizer tensors go to safetensors and everything else to JSON, so nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _fsync_dir(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def optimizer_to_files(state: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into flat tensors (safetensors) and a JSON-able remainder."""
    import torch

    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, run_state: dict,
                    keep: int | None) -> Path:
    """Write one complete checkpoint atomically, then prune old ones (never the newest complete)."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tensors, meta = optimizer_to_files(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=lambda o: None))
    (tmp / "state.json").write_text(json.dumps(run_state, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    marker = final / COMPLETE
    with open(marker, "w") as handle:  # written last: a checkpoint without it is incomplete
        handle.write(str(step))
        handle.flush()
        os.fsync(handle.fileno())
    if keep is not None:
        prune_checkpoints(root, keep)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (at least one is always kept)."""
    complete = complete_checkpoints(root)
    for old in complete[: max(len(complete) - max(keep, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
