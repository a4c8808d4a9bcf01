"""train(cfg): set-up in named steps (prepare.py), then the loop, readable top to bottom, on accelerate.

The pieces, as in the original Alpaca train.py: runtime, tokenizer and data, model, optimizer and
schedule, resume, the loop (accumulate, clip, step, log, eval, checkpoint) stopping on a signal, and
saving `final/`. The loop runs an objective: a loss module whose call gives the summed loss of a
micro-batch and whose `count` gives the units it is summed over, so a new objective is a new loss,
not a new loop. The loss of an optimizer step is the sum over all its micro-batches and processes
divided by all their units, so it does not depend on how the tokens were split into batches.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from instructkit.checkpoint import TrainingProgress, save_checkpoint
from instructkit.config import RunConfig
from instructkit.data.pipeline import describe_data
from instructkit.data.templates import stop_token_ids
from instructkit.defaults import describe as describe_choices
from instructkit.defaults import keep_split, resolve_eval
from instructkit.distributed import agreed_signal, full_weights, leave_process_group, no_sync, ranks_of
from instructkit.errors import TrainingDiverged, TrainingInterrupted
from instructkit.files import atomic_path, write_json
from instructkit.loss import count_supervised
from instructkit.metrics import MetricsLog, TrainingMonitor
from instructkit.models import check_runtime
from instructkit.prepare import (
    Loop,
    Runtime,
    describe_loop,
    describe_model,
    flops_counter,
    manifest_of,
    measure_peak,
    resume,
    setup_data,
    setup_loop,
    setup_model,
    setup_objective,
    setup_recipe,
    setup_reference,
    setup_runtime,
    template_note,
)
from instructkit.rundir import RunDirPlan, claim_run_dir, lock_run_dir, now, plan_run_dir, previous_config, write_config
from instructkit.selection import Tracker, restore_best, save_best

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from instructkit.data.templates import Template


class StopOnSignal:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second one acts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              "(send it again to stop at once).", flush=True)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def loss_sum(loss_fn: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Summed loss of one micro-batch: the single place the model is called while training."""
    return loss_fn(**batch)


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch's tensors on `device` (copied asynchronously where the device allows)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def eval_metrics(objective: torch.nn.Module, loader: Iterable[dict], accelerator: Accelerator,
                 loss_fn: torch.nn.Module | None = None) -> dict[str, float]:
    """Over the whole eval set, summed over processes: eval_loss and whatever else the objective's
    `eval_sums` counts (SupervisedLoss: token accuracy and teacher-forced exact match; PreferenceLoss:
    rewards, margin and preference accuracy), named by its `eval_summary`."""
    import torch

    sums = hasattr(objective, "eval_summary")
    loss_fn = loss_fn or objective  # the wrapped objective (DDP, FSDP root), called through its forward
    total = torch.zeros(objective.eval_width if sums else 2, dtype=torch.float64, device=accelerator.device)
    loss_fn.eval()
    with torch.no_grad():
        for batch in loader:
            on_device = to_device(batch, accelerator.device)
            if sums:
                total += loss_fn(**on_device, sums=True).double()
            else:
                total[0] += loss_sum(loss_fn, on_device).double()
                total[1] += objective.count(batch)
    loss_fn.train()
    total = accelerator.reduce(total, "sum")
    return objective.eval_summary(total) if sums else {"eval_loss": float(total[0] / total[1].clamp(min=1))}


def units_of(count: Callable[[dict], int | tuple[int, ...]], batch: dict) -> list[int]:
    """The units of each loss component of a micro-batch (one for SFT: supervised tokens)."""
    n = count(batch)
    return list(n) if isinstance(n, tuple) else [n]


def optimizer_step(accelerator: Accelerator, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, group: list, max_grad_norm: float, step: int = 0,
                   precision: str = "fp32", strategy: str = "single", accumulation: int = 1,
                   count: Callable[[dict], int | tuple[int, ...]] = count_supervised,
                   pop_stats: Callable[[], torch.Tensor | None] | None = None) -> dict:
    """One optimizer step over a group of micro-batches (collated on the CPU); returns the loss components'
    sums and units and the token counts, summed over all processes. Each component is divided by its units
    over the whole step, so the loss does not depend on how the batch was split. Counts come from the CPU
    copies, so the step syncs with the device once: to stop on a NaN or infinite loss (on any process)
    before the optimizer touches the weights (no checkpoint can hold them)."""
    import torch

    units = [sum(col) for col in zip(*(units_of(count, b) for b in group))]
    n_supervised = sum(count_supervised(b) for b in group)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in group)
    sequences = sum(int((b["position_ids"] == 0).sum()) if "position_ids" in b else b["input_ids"].shape[0]
                    for b in group)
    global_units = units
    if accelerator.num_processes > 1:
        global_units = accelerator.reduce(torch.tensor(units, device=accelerator.device), "sum").tolist()
    # DDP and FSDP average gradients over processes; multiplying back gives the mean over all units.
    # DeepSpeed also divides by its accumulation steps, so that is multiplied back too.
    factor = accelerator.num_processes * (accumulation if strategy == "deepspeed" else 1)
    scales = [factor / max(u, 1) for u in global_units]
    scale = scales[0] if len(scales) == 1 else torch.tensor(scales, device=accelerator.device)
    summed = torch.zeros(len(units), dtype=torch.float32, device=accelerator.device)
    for i, batch in enumerate(group):
        last = i == len(group) - 1
        if strategy == "deepspeed":
            loss_fn.set_gradient_accumulation_boundary(last)
        with no_sync(loss_fn, skip=not last and strategy in ("ddp", "fsdp")):
            loss = loss_sum(loss_fn, to_device(batch, accelerator.device))
            accelerator.backward((loss * scale).sum())
        summed += loss.detach()
    stats = pop_stats() if pop_stats else None
    local = [*summed.tolist(), n_supervised, tokens, sequences, *(stats.tolist() if stats is not None else [])]
    if accelerator.num_processes > 1:
        local = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    k = len(units)
    parts, (n_supervised, tokens, sequences), stats = local[:k], map(int, local[k:k + 3]), local[k + 3:] or None
    loss_value = sum(p / max(u, 1) for p, u in zip(parts, global_units))
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(step, loss_value, scheduler.get_last_lr()[0], precision)
    grad_norm = None
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(loss_fn.parameters(), max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss_parts": parts, "units": [float(u) for u in global_units], "supervised": n_supervised,
            "tokens": tokens, "sequences": sequences, "grad_norm": grad_norm, "stats": stats}


def save_final(run_dir: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: Template,
               state_dict: dict | None = None) -> Path:
    """final/: the adapter (PEFT) or full model (safetensors), the tokenizer carrying the template used
    in training as its chat template, and a generation config that stops at the end-of-turn token.
    `state_dict`: the full weights, where the model itself holds only shards."""
    from transformers import GenerationConfig

    final = run_dir / "final"
    with atomic_path(final, tmp_name=".final.tmp") as tmp:
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.chat_template = template.source
        tokenizer.save_pretrained(tmp)
        GenerationConfig(eos_token_id=stop_token_ids(tokenizer, template), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, do_sample=False,
                         max_new_tokens=256).save_pretrained(tmp)
    return final


def train(cfg: RunConfig, overwrite: bool = False, allow_config_change: bool = False) -> Path:
    """Train per `cfg` (resuming when the output directory holds a checkpoint of the same run) and
    return the run directory; raises UserError on bad input before anything is written."""
    plan_run_dir(cfg, overwrite, allow_config_change)  # refuse bad input before anything is written
    # Global rank 0 owns the directory for the whole run; the plan is made again under its lock, since
    # another process may have changed the directory meanwhile.
    with lock_run_dir(Path(cfg.output_dir), owner=int(os.environ.get("RANK", "0")) == 0):
        run_dir = _train(cfg, plan_run_dir(cfg, overwrite, allow_config_change))
    leave_process_group()
    return run_dir


def _train(cfg: RunConfig, plan_dir: RunDirPlan) -> Path:
    """The run itself, in the directory this process owns: set-up steps, the loop, final/ and the manifest."""
    started = now()
    check_runtime(cfg.model)  # refuse what this machine cannot run before tokenizing anything
    cfg = keep_split(cfg, previous_config(plan_dir))  # a resumed run trains on the rows it started with
    model_path, tokenizer, data = setup_data(cfg)
    cfg, choices = setup_recipe(cfg, data, plan_dir)  # every `auto` resolved from data, model and processes
    run = setup_runtime(cfg)
    for note in plan_dir.notes:
        run.say(f"note: {note}")
    run.say(describe_data(data, cfg.data.max_length))
    if note := template_note(cfg, data.template.name, bool(tokenizer.chat_template)):
        run.say(note)
    model = setup_model(cfg, model_path, run.plan)
    run.say(describe_model(model, model_path, run.plan))
    objective = setup_objective(cfg, model)
    data = setup_reference(cfg, run, objective, model, tokenizer.pad_token_id, data)
    loop = setup_loop(cfg, run, objective, model, tokenizer, data)
    cfg, more = resolve_eval(cfg, min(loop.steps_per_epoch, loop.total_steps), [e.n_supervised for e in data.eval],
                             previous_config(plan_dir))
    if choices := choices + more:
        run.say(describe_choices(choices))
    run.say(describe_loop(cfg, run, loop))
    progress = resume(plan_dir, run, model, loop)  # after all set-up, so nothing shifts the restored RNG
    step = progress.step if progress else 0
    run.accelerator.wait_for_everyone()  # every process has planned from the directory as it was
    manifest = manifest_of(cfg, run, plan_dir, model, model_path, data, loop, step, started, choices)
    log = None
    if run.main:
        claim_run_dir(plan_dir)
        write_config(plan_dir.path, cfg)
        write_json(plan_dir.path / "manifest.json", manifest)
        if any(r["bad"] for r in data.stats["bad_rows"].values()):
            write_json(plan_dir.path / "data_report.json", data.stats["bad_rows"])
        log = MetricsLog(plan_dir.path, "tensorboard" in cfg.train.report_to, resume_step=step if step else None)
    monitor = TrainingMonitor(log, loop.total_steps, step, cfg.train.logging_steps, flops_counter(model, cfg.method),
                              loop.peak_tflops, run.accelerator.num_processes, run.accelerator.device,
                              getattr(objective, "stats_summary", None),
                              remeasure=lambda: measure_peak(run, keep_rng=True))
    tracker = Tracker.resumed(cfg.train.best_metric, cfg.train.early_stopping_patience, progress)
    status = "failed"
    try:
        # One handler from the first step to the last file: a signal that arrives after the last step lets
        # final/ be written (a second one stops at once) instead of interrupting the save with no checkpoint.
        with StopOnSignal() as stop:
            step = fit(cfg, run, loop, objective, model, monitor, progress, tracker, bool(data.eval), stop)
            manifest.update(choose_final(cfg, run, model, tracker, step))
            run.accelerator.wait_for_everyone()
            full_state = full_weights(model, loop.loss_fn, run.strategy, run.accelerator)
            if run.main:
                final = save_final(plan_dir.path, model, tokenizer, data.template, full_state)
                manifest["final_loss"] = monitor.last_loss
                run.say(f"saved {final}")
        if stop.signum is not None:
            run.say(f"{signal.Signals(stop.signum).name} came after the last step: final/ is saved and the run is "
                    "complete")
        status = "completed"
    except (KeyboardInterrupt, TrainingInterrupted):
        status = "interrupted"
        raise
    finally:
        monitor.close()
        if run.main:
            manifest.update(status=status, end_time=now(), matmul_peak_tflops=monitor.peak)
            write_json(plan_dir.path / "manifest.json", manifest)
    return plan_dir.path


def keeps_best(cfg: RunConfig, run: Runtime) -> bool:
    """Whether best weights are tracked on disk: asked for, and not under DeepSpeed, whose partitioned
    parameters instructkit does not gather between steps."""
    return cfg.train.final_weights == "best" and run.strategy != "deepspeed"


def choose_final(cfg: RunConfig, run: Runtime, model: torch.nn.Module, tracker: Tracker, step: int) -> dict:
    """Load the best weights into the model when final/ should hold them; what was chosen, for the manifest."""
    out = {"best": {"step": tracker.best_step, tracker.metric: tracker.best_value}, "held_step": tracker.held_step,
           "last_step": step, "stopped_early": tracker.should_stop, "final_weights": "last"}
    held = tracker.held_step
    if cfg.train.final_weights == "best" and not keeps_best(cfg, run):
        run.say("note: under distributed: deepspeed final/ holds the last weights (best weights are not tracked)")
    if held is None or not keeps_best(cfg, run):
        return out
    if held == step:
        return {**out, "final_weights": "best"}
    if not restore_best(Path(cfg.output_dir), model, held):
        run.say(f"note: best/ does not hold step {held}; final/ holds the last weights")
        return out
    why = "the best" if held == tracker.best_step else f"within noise of the best (step {tracker.best_step})"
    run.say(f"final/: the weights of step {held}, {why} {tracker.metric} {tracker.best_value:.4f}; "
            f"training ended at step {step}")
    return {**out, "final_weights": "best"}


def fit(cfg: RunConfig, run: Runtime, loop: Loop, objective: torch.nn.Module, model: torch.nn.Module,
        monitor: TrainingMonitor, start: TrainingProgress | None, tracker: Tracker, has_eval: bool,
        stop: StopOnSignal) -> int:
    """The loop: optimizer steps of `gradient_accumulation_steps` micro-batches from the resumable
    order, logging, eval and checkpoints on their schedules; a signal checkpoints and stops, and so does
    an eval loss that has not improved for `early_stopping_patience` evaluations. Returns the last step."""
    tc, acc = cfg.train, run.accelerator
    step, epoch, start_batch = (start.step, start.epoch_index, start.batch_in_epoch) if start else (0, 0, 0)
    ranks = ranks_of(acc, sharded=run.strategy == "fsdp" and cfg.distributed.fsdp_state_dict == "sharded")
    keep_best = keeps_best(cfg, run)

    def checkpoint(at_step: int, epoch_index: int, batch: int) -> Path | None:
        progress = TrainingProgress(step=at_step, epoch_index=epoch_index, batch_in_epoch=batch,
                                    epoch=epoch_index + batch / loop.micro_per_epoch, total_steps=loop.total_steps,
                                    seed=cfg.seed, global_batch=loop.global_batch, **tracker.progress_fields())
        with monitor.paused():
            return save_checkpoint(Path(cfg.output_dir), at_step, model, loop.optimizer, loop.scheduler, progress,
                                   tc.save_total_limit, ranks)

    def evaluate() -> None:
        with monitor.paused():
            metrics = eval_metrics(objective, loop.eval_loader, acc, loop.loss_fn)
            monitor.eval_done(step, metrics)
            if tracker.update(step, metrics) and keep_best:
                save_best(Path(cfg.output_dir), model, step, tracker.metric, metrics[tracker.metric],
                          ranks_of(acc, sharded=False))
        if tracker.should_stop:
            run.say(f"early stopping at step {step}: {tracker.metric} has not improved for {tracker.since_best} "
                    f"evaluations (best {tracker.best_value:.4f} at step {tracker.best_step})")

    loop.loss_fn.train()
    while step < loop.total_steps and not tracker.should_stop:
        loop.sampler.set_position(epoch, start_batch * tc.per_device_train_batch_size)
        batches, done, start_batch = iter(loop.train_loader), start_batch, 0
        while done < loop.micro_per_epoch and step < loop.total_steps and not tracker.should_stop:
            n = min(tc.gradient_accumulation_steps, loop.micro_per_epoch - done)
            group = [next(batches) for _ in range(n)]
            done += n
            out = optimizer_step(acc, loop.loss_fn, loop.optimizer, loop.scheduler, group, tc.max_grad_norm,
                                 step + 1, run.plan.compute_precision, run.strategy,
                                 tc.gradient_accumulation_steps, objective.count,
                                 getattr(objective, "pop_stats", None))
            step += 1
            monitor.step_done(step, epoch + done / loop.micro_per_epoch, out, loop.scheduler.get_last_lr()[0])
            if has_eval and tc.eval_steps and step % tc.eval_steps == 0:
                evaluate()
            if tc.save_strategy == "steps" and step % tc.save_steps == 0 and step < loop.total_steps:
                checkpoint(step, epoch, done)
            if (signum := agreed_signal(stop.signum, acc)) is not None:
                raise TrainingInterrupted(signum, checkpoint(step, epoch, done))
        epoch += 1
        if done == loop.micro_per_epoch:
            if has_eval and not tc.eval_steps:
                evaluate()
            if tc.save_strategy == "epoch" and step < loop.total_steps and not tracker.should_stop:
                checkpoint(step, epoch - 1, done)
    if has_eval and tc.eval_steps and step % tc.eval_steps != 0 and not tracker.should_stop:
        evaluate()
    return step
