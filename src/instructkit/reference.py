"""DPO's reference log-probs: computed once, before training, and cached beside the tokenized data.

The reference is the model as training starts. With a new LoRA adapter that is the base model, which
the same weights give with the adapter disabled; with full tuning, or an adapter continued from a
supervised run, it is the starting weights, read before any checkpoint is restored. One forward pass
over the pairs, in eval mode and the run's compute precision, so training holds one model and never
runs a second forward per step. The cache key covers the pairs' tokens, the reference weights (files,
sizes, modification times, or a hub id and revision) and the precision, so a changed model or data set
is never served stale; a resumed run reads the same numbers, so its steps are bit-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from instructkit.config import instructkit_home
from instructkit.files import atomic_path

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from instructkit.data.preference import PairExample

REF_FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".json", ".bin", ".model")


def pairs_digest(pairs: list[PairExample]) -> str:
    """A digest of every pair's tokens and masks: the data half of the cache key."""
    h = hashlib.sha256()
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            h.update(json.dumps([side.input_ids, side.labels]).encode())
    return h.hexdigest()


def weights_fingerprint(path: str | Path, revision: str | None = None) -> list:
    """What identifies the reference weights without reading them: each file's name, size and mtime in a
    local directory, else the hub id and revision."""
    folder = Path(path)
    if not folder.is_dir():
        return [str(path), revision]
    return [str(folder.resolve())] + sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                            for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES)


def reference_key(pairs: dict[str, list[PairExample]], weights: list, precision: str) -> str:
    parts = [REF_FORMAT, {k: pairs_digest(v) for k, v in sorted(pairs.items())}, weights, precision]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def compute_logps(objective: torch.nn.Module, pairs: list[PairExample], batch_size: int, pad_id: int,
                  device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """[n, 2] summed answer log-probs (chosen, rejected) of each pair under the model as it is now."""
    import torch

    from instructkit.data.collate import pad_pairs

    out = []
    was_training = objective.training
    objective.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = [dataclasses.replace(p, ref=None) for p in pairs[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in pad_pairs(chunk, pad_id).items()}
            with autocast():
                logps, _ = objective.sequence_logps(batch["input_ids"], batch["labels"], batch["attention_mask"])
            out.append(logps.float().view(2, -1).T.cpu())
    objective.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def _save(directory: Path, logps: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(directory, keep_existing=True) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in logps.items()}, str(tmp / "logps.safetensors"))


def _load(directory: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    file = directory / "logps.safetensors"
    return load_file(str(file)) if file.is_file() else None


def with_reference(pairs: list[PairExample], logps: torch.Tensor) -> list[PairExample]:
    return [dataclasses.replace(p, ref=(float(c), float(r))) for p, (c, r) in zip(pairs, logps.tolist())]


def attach_reference(objective: torch.nn.Module, model: torch.nn.Module, splits: dict[str, list[PairExample]],
                     weights: list, precision: str, batch_size: int, pad_id: int, device: torch.device,
                     autocast: Callable[[], contextlib.AbstractContextManager], fresh_adapter: bool, cache: bool = True,
                     say=print) -> dict[str, list[PairExample]]:
    """Every split's pairs with their reference log-probs, from the cache or one pass of the model. The
    processes of a launch take turns on a file lock (as for the data cache): the first computes and writes,
    the others read what it wrote."""
    key = reference_key(splits, weights, precision)
    directory = instructkit_home() / "data-cache" / f"ref-{key}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory) + ".lock") if cache else contextlib.nullcontext()
    with lock:
        logps = _load(directory) if cache else None
        if logps is None or set(logps) != set(splits):
            # A new adapter's B matrices are zero, so disabling it gives exactly the base model, cheaper.
            off = model.disable_adapter() if fresh_adapter and hasattr(model, "disable_adapter") \
                else contextlib.nullcontext()
            with off:
                logps = {name: compute_logps(objective, pairs, batch_size, pad_id, device, autocast)
                         for name, pairs in splits.items()}
            if cache:
                _save(directory, logps)
            say(f"reference log-probs: computed for {sum(len(p) for p in splits.values())} pairs "
                f"({'base model, adapter disabled' if fresh_adapter else 'the starting weights'})")
        else:
            say(f"reference log-probs: cache hit ({directory.name})")
    return {name: with_reference(pairs, logps[name]) for name, pairs in splits.items()}
