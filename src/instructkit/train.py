"""train(cfg): the training loop, readable top to bottom, on accelerate.

Six pieces, as in the original Alpaca train.py: model and tokenizer, data, optimizer and schedule,
the loop (accumulate, clip, step, log, eval, checkpoint), stopping on a signal, and saving `final/`.
The loss of an optimizer step is the mean over all its supervised tokens, across micro-batches and
processes, so it does not depend on how the tokens were split into batches.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

from instructkit.checkpoint import load_checkpoint, save_checkpoint
from instructkit.config import RunConfig
from instructkit.data.collate import pad_batch
from instructkit.data.pipeline import build_datasets, describe_data
from instructkit.data.sampler import ResumableSampler
from instructkit.data.packing import check_isolation, pack, packed_batch, packing_efficiency
from instructkit.data.templates import stop_token_ids
from instructkit.distributed import (agreed_signal, check_distributed, check_resume_world, env_world_size,
                                     eval_shard, full_weights, make_accelerator, no_sync, ranks_of, resolve_strategy,
                                     shard_fsdp)
from instructkit.errors import TrainingDiverged, TrainingInterrupted
from instructkit.env import device_summary, package_versions
from instructkit.loss import SupervisedLoss, count_supervised
from instructkit.metrics import MetricsLog, device_stats, matmul_peak_tflops, training_flops
from instructkit.models import (DTYPES, apply_lora, check_runtime, count_parameters, load_model, load_tokenizer,
                                plan_loading, resolve_model)
from instructkit.rundir import (claim_run_dir, git_commit, now, plan_run_dir, resume_history, write_config,
                                write_json)

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


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


def loss_sum(loss_fn: SupervisedLoss, batch: dict):
    """Summed loss of one micro-batch: the single place the model is called while training."""
    return loss_fn(**batch)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def eval_loss(loss_fn, loader, accelerator) -> float:
    """Mean loss per supervised token over the whole eval set, summed over processes."""
    import torch

    loss_fn.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            total[0] += loss_sum(loss_fn, to_device(batch, accelerator.device)).double()
            total[1] += count_supervised(batch)
    loss_fn.train()
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


def optimizer_step(accelerator, loss_fn, optimizer, scheduler, group: list, max_grad_norm: float, step: int = 0,
                   precision: str = "fp32", strategy: str = "single", accumulation: int = 1) -> dict:
    """One optimizer step over a group of micro-batches (collated on the CPU); returns the loss and
    token counts summed over all processes. Counts come from the CPU copies, so the step syncs with the
    device once: to stop on a NaN or infinite loss (on any process) before the optimizer touches the
    weights (no checkpoint can hold them)."""
    import torch

    n_supervised = sum(count_supervised(b) for b in group)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in group)
    sequences = sum(int((b["position_ids"] == 0).sum()) if "position_ids" in b else b["input_ids"].shape[0]
                    for b in group)
    global_supervised = n_supervised
    if accelerator.num_processes > 1:
        global_supervised = accelerator.reduce(torch.tensor(n_supervised, device=accelerator.device), "sum").item()
    # DDP and FSDP average gradients over processes; multiplying back gives the mean over all tokens.
    # DeepSpeed also divides by its accumulation steps, so that is multiplied back too.
    scale = accelerator.num_processes / max(global_supervised, 1) * (accumulation if strategy == "deepspeed" else 1)
    summed = torch.zeros((), dtype=torch.float32, device=accelerator.device)
    for i, batch in enumerate(group):
        last = i == len(group) - 1
        if strategy == "deepspeed":
            loss_fn.set_gradient_accumulation_boundary(last)
        with no_sync(loss_fn, skip=not last and strategy in ("ddp", "fsdp")):
            loss = loss_sum(loss_fn, to_device(batch, accelerator.device))
            accelerator.backward(loss * scale)
        summed += loss.detach()
    if accelerator.num_processes > 1:
        totals = torch.tensor([summed.item(), n_supervised, tokens, sequences], dtype=torch.float64,
                              device=accelerator.device)
        totals = accelerator.reduce(totals, "sum").tolist()
        summed, n_supervised, tokens, sequences = totals[0], int(totals[1]), int(totals[2]), int(totals[3])
    else:
        summed = summed.item()
    if not math.isfinite(summed):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(step, summed, scheduler.get_last_lr()[0], precision)
    grad_norm = None
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(loss_fn.parameters(), max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss_sum": summed, "supervised": n_supervised, "tokens": tokens, "sequences": sequences,
            "grad_norm": grad_norm}


def save_final(run_dir: Path, model, tokenizer, template, state_dict: dict | None = None) -> Path:
    """final/: the adapter (PEFT) or full model (safetensors), the tokenizer carrying the template used
    in training as its chat template, and a generation config that stops at the end-of-turn token.
    `state_dict`: the full weights, where the model itself holds only shards."""
    import os
    import shutil

    from transformers import GenerationConfig

    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.chat_template = template.source
    tokenizer.save_pretrained(tmp)
    GenerationConfig(eos_token_id=stop_token_ids(tokenizer, template), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     do_sample=False, max_new_tokens=256).save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def train(cfg: RunConfig, overwrite: bool = False, allow_config_change: bool = False) -> Path:
    """Train per `cfg` (resuming when the output directory holds a checkpoint of the same run) and
    return the run directory; raises UserError on bad input before anything is written."""
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    started = now()
    plan_dir = plan_run_dir(cfg, overwrite, allow_config_change)
    run_dir = plan_dir.path
    check_runtime(cfg.model)
    tc = cfg.train
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    check_distributed(cfg, torch.cuda.is_available())
    plan = plan_loading(cfg.model, cfg.method, training=True)
    strategy = resolve_strategy(cfg.distributed, env_world_size())
    accelerator = make_accelerator(MIXED_PRECISION[plan.compute_precision], strategy, cfg)
    say, main = accelerator.print, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    for note in plan_dir.notes:
        say(f"note: {note}")
    set_seed(cfg.seed)

    # 1. Tokenizer and data: every bad row is reported before a model is loaded.
    model_path = resolve_model(cfg.model.name_or_path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision)
    # One process tokenizes and fills the cache while the others wait on its file lock, not on a
    # collective, so a long tokenization cannot trip train.ddp_timeout.
    data = build_datasets(cfg.data, tokenizer, cfg.seed)
    say(describe_data(data, cfg.data.max_length))

    # 2. Model: precision, attention, LoRA or full.
    model = load_model(model_path, cfg.model, plan)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora, cfg.model.gradient_checkpointing, cfg.model.load_in_4bit)
    trainable, total = count_parameters(model)
    say(f"model: {model_path} ({plan.weights_dtype} weights, {plan.compute_precision} compute, "
        f"{plan.attn_implementation}); trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)")

    # 3. Optimizer, data order, schedule.
    if not cfg.model.load_in_4bit:  # on its device before the optimizer, so AdamW can be fused on CUDA
        model.to(accelerator.device)
    if cfg.data.packing:
        check_isolation(model, len(tokenizer), next(model.parameters()).device,
                        atol=1e-3 if plan.compute_precision == "fp32" else 5e-2)
        lengths = [len(e.input_ids) for e in data.train]
        train_set = [[data.train[i] for i in b] for b in pack(lengths, cfg.data.max_length)]
        train_collate = packed_batch
        say(f"packing: {len(data.train)} examples in {len(train_set)} rows of <= {cfg.data.max_length} tokens "
            f"({packing_efficiency(lengths, cfg.data.max_length):.1%} filled)")
    else:
        train_set, train_collate = data.train, partial(pad_batch, pad_id=tokenizer.pad_token_id)
    # The order is a function of (seed, epoch), so a resumed run continues it exactly; the loader's own
    # generator keeps worker seeding from drawing on the global RNG that dropout uses.
    lengths = [sum(len(e.input_ids) for e in item) if cfg.data.packing else len(item.input_ids) for item in train_set]
    sampler = ResumableSampler(len(train_set), cfg.seed, accelerator.process_index, accelerator.num_processes,
                               lengths if tc.group_by_length else None, tc.per_device_train_batch_size)
    train_loader = DataLoader(train_set, batch_size=tc.per_device_train_batch_size, sampler=sampler,
                              collate_fn=train_collate, num_workers=tc.dataloader_num_workers,
                              generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = DataLoader(eval_shard(data.eval, rank, world), batch_size=tc.per_device_eval_batch_size,
                             collate_fn=partial(pad_batch, pad_id=tokenizer.pad_token_id))
    loss_fn = SupervisedLoss(model, compile=tc.compile)
    if strategy == "fsdp":  # sharded before the optimizer is built, so it holds the sharded parameters
        shard_fsdp(loss_fn, model, cfg.distributed, DTYPES[plan.compute_precision], accelerator.device)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    fused = tc.optim == "adamw_torch_fused" or (accelerator.device.type == "cuda" and strategy != "fsdp")
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=fused or None)
    if strategy != "fsdp":  # DDP wrapping (or the DeepSpeed engine) and autocast
        loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    micro_per_epoch = math.ceil(sampler.per_process() / tc.per_device_train_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.gradient_accumulation_steps)
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(tc.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(tc.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    peak = matmul_peak_tflops(DTYPES[plan.compute_precision], str(accelerator.device),
                              size=4096 if accelerator.device.type == "cuda" else 1024)
    flops_of = partial(_flops, (model.get_base_model() if hasattr(model, "get_base_model") else model).config,
                       cfg.method)
    global_batch = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world
    say(f"training: {total_steps} optimizer steps, {steps_per_epoch} per epoch; batch "
        f"{tc.per_device_train_batch_size} x accumulation {tc.gradient_accumulation_steps} x {world} "
        f"process(es) = global batch {global_batch} ({strategy}); measured {plan.compute_precision} matmul peak "
        f"{peak:.3f} TFLOP/s")

    # 4. Resume (after all setup, so nothing above shifts the restored RNG), then claim the directory.
    step, epoch, start_batch = 0, 0, 0
    if plan_dir.action == "resume":
        saved = json.loads((plan_dir.checkpoint / "state.json").read_text())
        if (note := check_resume_world(saved, world, global_batch, plan_dir.checkpoint)) is not None:
            say(f"note: {note}")
        state = load_checkpoint(plan_dir.checkpoint, model, optimizer, scheduler, rank)
        step, epoch, start_batch = state["step"], state["epoch_index"], state["batch_in_epoch"]
        if start_batch >= micro_per_epoch:
            epoch, start_batch = epoch + 1, 0
        say(f"resumed from {plan_dir.checkpoint} at step {step} (epoch {epoch}, batch {start_batch})")
    accelerator.wait_for_everyone()  # every process has planned from the directory as it was
    if main:
        claim_run_dir(plan_dir)
        write_config(run_dir, cfg)
    manifest = {
        "run_name": cfg.run_name, "status": "running", "start_time": started, "end_time": None,
        "seed": cfg.seed, "versions": package_versions(), "device": device_summary(),
        "model": {"name_or_path": cfg.model.name_or_path, "resolved": model_path, "revision": cfg.model.revision},
        "method": cfg.method, "precision": plan.compute_precision, "attn_implementation": plan.attn_implementation,
        "parameters": {"trainable": trainable, "total": total}, "data_files": data.stats["data_files"],
        "data": data.stats, "total_steps": total_steps, "git_commit": git_commit(),
        "resumed": resume_history(run_dir, plan_dir, step), "matmul_peak_tflops": peak,
        "distributed": {"strategy": strategy, "world_size": world, "global_batch": global_batch},
    }
    log = None
    if main:
        write_json(run_dir / "manifest.json", manifest)
        if any(r["bad"] for r in data.stats["bad_rows"].values()):
            write_json(run_dir / "data_report.json", data.stats["bad_rows"])
        log = MetricsLog(run_dir, "tensorboard" in tc.report_to, resume_step=step if step else None)

    ranks = ranks_of(accelerator, sharded=strategy == "fsdp" and cfg.distributed.fsdp_state_dict == "sharded")

    def checkpoint(at_step: int, epoch_index: int, batch: int) -> Path | None:
        run_state = {"step": at_step, "epoch_index": epoch_index, "batch_in_epoch": batch,
                     "epoch": epoch_index + batch / micro_per_epoch, "total_steps": total_steps, "seed": cfg.seed,
                     "global_batch": global_batch}
        return save_checkpoint(run_dir, at_step, model, optimizer, scheduler, run_state, tc.save_total_limit, ranks)

    # 5. The loop.
    loss_fn.train()
    last_loss = float("nan")
    window = new_window()
    # In a log file the per-step lines say the same as the bar, without its redraws.
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
               disable=not main or not sys.stderr.isatty(), dynamic_ncols=True)
    status = "failed"
    try:
        with StopOnSignal() as stop:
            while step < total_steps:
                sampler.set_position(epoch, start_batch * tc.per_device_train_batch_size)
                batches, done, start_batch = iter(train_loader), start_batch, 0
                while done < micro_per_epoch and step < total_steps:
                    n = min(tc.gradient_accumulation_steps, micro_per_epoch - done)
                    group = [next(batches) for _ in range(n)]
                    done += n
                    out = optimizer_step(accelerator, loss_fn, optimizer, scheduler, group, tc.max_grad_norm,
                                         step + 1, plan.compute_precision, strategy, tc.gradient_accumulation_steps)
                    step += 1
                    bar.update(1)
                    for key in ("loss_sum", "supervised", "tokens", "sequences"):
                        window[key] += out[key]
                    at_epoch = epoch + done / micro_per_epoch
                    if step % tc.logging_steps == 0 or step == total_steps:
                        elapsed = time.perf_counter() - window["start"]
                        last_loss = window["loss_sum"] / max(window["supervised"], 1)
                        record = {"step": step, "epoch": round(at_epoch, 4), "loss": round(last_loss, 6),
                                  "lr": scheduler.get_last_lr()[0],
                                  "grad_norm": None if out["grad_norm"] is None else float(out["grad_norm"]),
                                  "tokens_per_s": round(window["tokens"] / elapsed, 1),
                                  "supervised_tokens": window["supervised"], "elapsed_s": round(elapsed, 3),
                                  "mfu": flops_of(window) and round(flops_of(window) / elapsed / 1e12 / (peak * world), 4),
                                  **device_stats(accelerator.device)}
                        if main:
                            log.log(record)
                            mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "?"
                            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}",
                                            tok_s=f"{record['tokens_per_s']:.0f}", mfu=mfu)
                            bar.write(f"step {step}/{total_steps} epoch {at_epoch:.2f} loss {last_loss:.4f} "
                                      f"lr {record['lr']:.2e} tokens/s {record['tokens_per_s']:.0f} MFU {mfu}")
                        window = new_window()
                    if data.eval and tc.eval_steps and step % tc.eval_steps == 0:
                        _log_eval(log, bar, step, eval_loss(loss_fn, eval_loader, accelerator))
                    if tc.save_strategy == "steps" and step % tc.save_steps == 0 and step < total_steps:
                        checkpoint(step, epoch, done)
                    if (signum := agreed_signal(stop.signum, accelerator)) is not None:
                        path = checkpoint(step, epoch, done)
                        status = "interrupted"
                        raise TrainingInterrupted(signum, path)
                epoch += 1
                if done == micro_per_epoch:
                    if data.eval and not tc.eval_steps:
                        _log_eval(log, bar, step, eval_loss(loss_fn, eval_loader, accelerator))
                    if tc.save_strategy == "epoch" and step < total_steps:
                        checkpoint(step, epoch - 1, done)

        # 6. Save final/ and close the manifest.
        if data.eval and tc.eval_steps and step % tc.eval_steps != 0:
            _log_eval(log, bar, step, eval_loss(loss_fn, eval_loader, accelerator))
        accelerator.wait_for_everyone()
        full_state = full_weights(model, loss_fn, strategy, accelerator)
        if main:
            final = save_final(run_dir, model, tokenizer, data.template, full_state)
            manifest["final_loss"] = last_loss
            say(f"saved {final}")
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        bar.close()
        if main:
            manifest.update(status=status, end_time=now())
            write_json(run_dir / "manifest.json", manifest)
            log.close()
    return run_dir


def new_window() -> dict:
    """Counters of one logging window."""
    return {"loss_sum": 0.0, "supervised": 0, "tokens": 0, "sequences": 0, "start": time.perf_counter()}


def _flops(config, method: str, window: dict) -> float | None:
    """Model FLOPs of a logging window, or None for an architecture whose config lacks the sizes."""
    try:
        return training_flops(config, method, window["tokens"], window["supervised"],
                              window["tokens"] / max(window["sequences"], 1))
    except (AttributeError, TypeError):
        return None


def _log_eval(log, bar, step: int, loss: float) -> None:
    if log is not None:
        log.log({"step": step, "eval_loss": round(loss, 6), "eval_ppl": round(math.exp(min(loss, 50)), 4)})
        bar.write(f"step {step} eval_loss {loss:.4f} eval_ppl {math.exp(min(loss, 50)):.3f}")
