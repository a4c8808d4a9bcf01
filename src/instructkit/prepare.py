"""The set-up of a training run in named steps, as torchtune's recipes and litgpt's `main` do it:
runtime (processes, precision), tokenizer and data, model, loaders, optimizer and schedule, resume,
and the run directory's manifest. `train.train` calls them in this order, then runs the loop;
`bench/memory.py` uses `setup_model` to load a model exactly as training does.

The order matters for exact resume only in one way: the checkpoint's RNG states are restored last
(`resume`), so nothing set up before can shift them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from instructkit.checkpoint import TrainingProgress, load_checkpoint, read_progress
from instructkit.config import DTYPES, RunConfig
from instructkit.data.collate import pad_batch, pad_pairs
from instructkit.data.packing import (PackedRows, check_isolation, isolation_tolerance, pack, packed_batch,
                                     packing_efficiency, padding_free_batch, use_padding_free)
from instructkit.data.pipeline import Datasets, build_datasets, check_objective
from instructkit.data.sampler import ResumableSampler
from instructkit.data.store import lengths_of
from instructkit.defaults import AUTO, BETA, NLL_WEIGHT, Choice, resolve
from instructkit.distributed import (
    check_distributed,
    check_resume_world,
    env_world_size,
    eval_shard,
    make_accelerator,
    resolve_strategy,
    shard_fsdp,
)
from instructkit.env import device_summary, package_versions
from instructkit.errors import UserError, user_error
from instructkit.kernels import kernels_of
from instructkit.metrics import Window, matmul_peak_tflops, model_flops
from instructkit.models import (
    LoadPlan,
    apply_lora,
    check_runtime,
    count_parameters,
    load_config_tokenizer,
    load_model,
    plan_loading,
    quiet_peft,
    training_source,
)
from instructkit.rundir import RunDirPlan, git_commit, previous_config, resume_history

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Runtime:
    """The processes of this run and how they compute."""

    accelerator: Any
    strategy: str  # single | ddp | fsdp | deepspeed
    plan: LoadPlan

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        self.accelerator.print(text)


@dataclass
class Loop:
    """What the training loop runs on: loaders, optimizer, schedule and the step counts they imply."""

    loss_fn: Any  # the objective, wrapped for DDP or DeepSpeed where used
    optimizer: Any
    scheduler: Any
    sampler: ResumableSampler
    train_loader: Any
    eval_loader: Any
    micro_per_epoch: int  # micro-batches of one process in one epoch
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    peak_tflops: float  # measured matmul peak of this device in the compute precision (MFU's denominator)


def setup_runtime(cfg: RunConfig) -> Runtime:
    """Refuse what this machine cannot run, then start accelerate and seed every RNG."""
    import torch
    from accelerate.utils import set_seed

    check_runtime(cfg.model)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    check_distributed(cfg, torch.cuda.is_available())
    plan = plan_loading(cfg.model, cfg.method, training=True)
    strategy = resolve_strategy(cfg.distributed, env_world_size())
    accelerator = make_accelerator(MIXED_PRECISION[plan.compute_precision], strategy, cfg)
    set_seed(cfg.seed)
    return Runtime(accelerator, strategy, plan)


def setup_data(cfg: RunConfig) -> tuple[str, Any, Datasets]:
    """(model path, tokenizer, tokenized data): every bad row is reported before a model is loaded.
    One process tokenizes and fills the cache while the others wait on its file lock, not on a
    collective, so a long tokenization cannot trip train.ddp_timeout."""
    model_path, tokenizer = load_config_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer, cfg.seed)
    check_objective(cfg.objective, data.stats.get("kind", "sft"))
    return model_path, tokenizer, data


def template_note(cfg: RunConfig, template_name: str, saved_template: bool) -> str | None:
    """Which template a run starting from a model uses: inherited from the supervised run it continues (its
    final/ tokenizer carries the template it trained with), or, for a preference run on any other model, the
    one chosen here, said out loud: pairs must be rendered the way the model was tuned. `saved_template`:
    whether the model's tokenizer carries a chat template (a merged instructkit model or an instruct model)."""
    if training_source(cfg.model.name_or_path, cfg.model.allow_pickle).from_run:
        how = "inherited from" if cfg.data.template == AUTO else "set by data.template, not the one trained in"
        return f"template: {template_name}, {how} the run {cfg.model.name_or_path}"
    if cfg.objective == "sft":
        return None
    if cfg.data.template != AUTO:
        why = f"set by data.template ({cfg.data.template})"
    elif saved_template:
        why = "the chat template saved with the model's tokenizer, which a model tuned on it answers to"
    else:
        why = "the builtin fallback: the model's tokenizer carries no chat template, so no trained one is known"
    return (f"note: {cfg.model.name_or_path} is not an instructkit run; {cfg.objective} renders the pairs with the "
            f"'{template_name}' template: {why}. If the model was supervised-tuned with another, set data.template "
            "to it, or point model.name_or_path at the supervised run (runs/NAME), whose template is inherited")


def setup_recipe(cfg: RunConfig, data: Datasets, plan_dir: RunDirPlan) -> tuple[RunConfig, list[Choice]]:
    """The config with every `auto` of the recipe resolved from the data, the model and the processes
    (defaults.py), before the runtime is built (DeepSpeed takes the accumulation at start)."""
    n_params = None
    if cfg.method == "full" and cfg.train.learning_rate == AUTO:
        from instructkit.estimate import model_shape

        try:
            n_params = model_shape(cfg).total
        except (UserError, OSError, ValueError):
            n_params = None  # auto_learning_rate says which key to set
    val = Choice("data.val_size", data.stats["val_size"]["value"], data.stats["val_size"]["why"])
    if not data.eval and (isinstance(cfg.train.eval_steps, int) or cfg.eval.generate):
        key = "train.eval_steps" if isinstance(cfg.train.eval_steps, int) else "eval.generate"
        raise user_error(f"{key} needs eval data, and data.val_size: auto held none out ({val.why})", key,
                         "set data.eval_file, or data.val_size to a fraction or a row count")
    return resolve(cfg, len(data.train), val, env_world_size(), n_params, previous_config(plan_dir))


def setup_model(cfg: RunConfig, model_path: str, plan: LoadPlan) -> torch.nn.Module:
    """The model as training uses it: the plan's precision and attention, no KV cache, optional
    gradient checkpointing, and a LoRA adapter (the base frozen) or every weight trainable."""
    model = load_model(model_path, cfg.model, plan)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    adapter = training_source(cfg.model.name_or_path, cfg.model.allow_pickle).adapter
    if adapter is not None:
        return continue_adapter(model, adapter, cfg.method == "lora", cfg)
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora, cfg.model.gradient_checkpointing, cfg.model.load_in_4bit)
    return model


def continue_adapter(model: torch.nn.Module, adapter: Path, trainable: bool, cfg: RunConfig) -> torch.nn.Module:
    """A supervised run's LoRA adapter on its base: trained on (method: lora, keeping its rank and targets,
    so lora.* settings do not apply), or merged into the weights for full tuning."""
    from peft import PeftModel, prepare_model_for_kbit_training

    if cfg.model.load_in_4bit:  # as apply_lora prepares a quantized base for a new adapter
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)

    with quiet_peft():
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    return model if trainable else model.merge_and_unload()


def setup_objective(cfg: RunConfig, model: torch.nn.Module) -> torch.nn.Module:
    """The loss module the loop runs: supervised cross entropy, or a preference loss over pairs."""
    from instructkit.loss import PreferenceLoss, SupervisedLoss

    if cfg.objective == "sft":
        return SupervisedLoss(model, compile=cfg.train.compile)
    pref = cfg.preference
    # (training resolves both first, in setup_recipe; bench/memory.py builds the loss from the config as written)
    beta = BETA[cfg.objective] if pref.beta == AUTO else pref.beta
    nll = NLL_WEIGHT[cfg.objective] if pref.nll_weight == AUTO else pref.nll_weight
    return PreferenceLoss(model, cfg.objective, beta, pref.label_smoothing, pref.gamma, nll, compile=cfg.train.compile)


def setup_reference(cfg: RunConfig, run: Runtime, objective: torch.nn.Module, model: torch.nn.Module,
                    pad_id: int, data: Datasets) -> Datasets:
    """DPO's pairs with the reference log-probs of the starting model (reference.py); other objectives
    need none. Before any checkpoint is restored, so a resumed run's reference is its start's."""
    if cfg.objective != "dpo":
        return data
    import torch

    from instructkit.reference import attach_reference, weights_fingerprint

    if not cfg.model.load_in_4bit:
        model.to(run.accelerator.device)
    source = training_source(cfg.model.name_or_path, cfg.model.allow_pickle)
    compute = run.plan.compute_precision
    # Everything that changes the numbers is in the key: the weights, how they are loaded, and how computed.
    weights = [weights_fingerprint(source.path, cfg.model.revision),
               source.adapter and weights_fingerprint(source.adapter), cfg.method, run.plan.weights_dtype,
               cfg.model.load_in_4bit, run.plan.attn_implementation, run.accelerator.device.type]
    device = run.accelerator.device

    def autocast():  # the policy's compute precision, whatever engine autocasts (or not) during training
        return torch.autocast(device.type, dtype=getattr(torch, DTYPES[compute]), enabled=compute != "fp32")

    splits = attach_reference(objective, model, {"train": data.train, "eval": data.eval}, weights,
                              compute, cfg.train.per_device_eval_batch_size, pad_id, device, autocast,
                              fresh_adapter=cfg.method == "lora" and source.adapter is None, cache=cfg.data.cache,
                              say=run.say)
    return dataclasses.replace(data, train=splits["train"], eval=splits["eval"])


def collate_for(kind: str, pad_id: int) -> Callable[[list], dict]:
    """Padded batches of examples, or of pairs (chosen rows, then rejected rows)."""
    return partial(pad_pairs if kind == "preference" else pad_batch, pad_id=pad_id)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (non-reentrant, which works with frozen LoRA bases); under the name
    transformers 5 uses (its old name warns on every run) or the old one on releases that lack it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def describe_model(model: torch.nn.Module, model_path: str, plan: LoadPlan) -> str:
    trainable, total = count_parameters(model)
    return (f"model: {model_path} ({plan.weights_dtype} weights, {plan.compute_precision} compute, "
            f"{plan.attn_implementation}); trainable parameters {trainable:,} of {total:,} "
            f"({100 * trainable / total:.2f}%)\nkernels: {kernels_of(model).value} ({kernels_of(model).why})")


def setup_train_set(cfg: RunConfig, run: Runtime, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                    data: Datasets) -> tuple[list, Callable[[list], dict], list[int]]:
    """(items, collate, lengths): examples, or packed rows of them when data.packing is on (after
    checking that this model keeps packed examples apart)."""
    lengths = lengths_of(data.train)  # from the store's index: no example is read
    if data.stats.get("kind") == "preference":
        return data.train, collate_for("preference", tokenizer.pad_token_id), lengths
    if not cfg.data.packing:
        from instructkit.cpu_kernels import NAME as CPU_ATTENTION  # attends a row's examples one by one

        # ... except with attention dropout or a sliding window, which it leaves to SDPA over the whole row
        lm = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        per_example = (run.plan.attn_implementation == CPU_ATTENTION and not getattr(lm, "attention_dropout", 0)
                       and getattr(lm, "sliding_window", None) is None)
        if use_padding_free(cfg.data.padding_free, per_example,
                            run.plan.compute_precision, model, len(tokenizer), run.say):
            return data.train, padding_free_batch, lengths
        return data.train, partial(pad_batch, pad_id=tokenizer.pad_token_id), lengths
    check_isolation(model, len(tokenizer), next(model.parameters()).device,
                    **isolation_tolerance(run.plan.compute_precision))
    bins = pack(lengths, cfg.data.max_length)
    rows = PackedRows(data.train, bins, lengths)
    run.say(f"packing: {len(data.train)} examples in {len(rows)} rows of <= {cfg.data.max_length} tokens "
            f"({packing_efficiency(lengths, cfg.data.max_length, bins):.1%} filled)")
    return rows, packed_batch, rows.lengths


def setup_loop(cfg: RunConfig, run: Runtime, objective: torch.nn.Module, model: torch.nn.Module,
               tokenizer: PreTrainedTokenizerBase, data: Datasets) -> Loop:
    """Data order, loaders, optimizer and schedule around the objective (a loss module over `model`)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    tc, acc = cfg.train, run.accelerator
    if not cfg.model.load_in_4bit:  # on its device before the optimizer, so AdamW can be fused on CUDA
        model.to(acc.device)
    items, collate, lengths = setup_train_set(cfg, run, model, tokenizer, data)
    # The order is a function of (seed, epoch), so a resumed run continues it exactly; the loader's own
    # generator keeps worker seeding from drawing on the global RNG that dropout uses.
    sampler = ResumableSampler(len(items), cfg.seed, acc.process_index, acc.num_processes,
                               lengths if tc.group_by_length else None, tc.per_device_train_batch_size)
    train_loader = DataLoader(items, batch_size=tc.per_device_train_batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=tc.dataloader_num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = DataLoader(eval_shard(data.eval, acc.process_index, acc.num_processes),
                             batch_size=tc.per_device_eval_batch_size,
                             collate_fn=collate_for(data.stats.get("kind", "sft"), tokenizer.pad_token_id))
    loss_fn, optimizer = setup_optimizer(cfg, run, objective, model)
    micro_per_epoch = math.ceil(sampler.per_process() / tc.per_device_train_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.gradient_accumulation_steps)
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(tc.lr_scheduler_type, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=math.ceil(tc.warmup_ratio * total_steps))
    peak = measure_peak(run)
    global_batch = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * acc.num_processes
    return Loop(loss_fn, optimizer, scheduler, sampler, train_loader, eval_loader, micro_per_epoch, steps_per_epoch,
                total_steps, global_batch, peak)


def measure_peak(run: Runtime, keep_rng: bool = False) -> float:
    """This device's matmul TFLOP/s in the compute precision, measured now (MFU's denominator). keep_rng:
    the random matrices come from a forked generator, so a measurement in the middle of training leaves the
    draws of dropout as they were (runs stay reproducible whether or not it happened)."""
    import torch

    device = run.accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=keep_rng):
        return matmul_peak_tflops(DTYPES[run.plan.compute_precision], str(device),
                                  size=4096 if device.type == "cuda" else 1024)


def setup_optimizer(cfg: RunConfig, run: Runtime, objective: torch.nn.Module,
                    model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(loss_fn, optimizer): AdamW over the trainable parameters, after FSDP sharding (so it holds the
    shards), then wrapped for DDP or DeepSpeed and autocast by accelerate."""
    import torch

    tc, acc = cfg.train, run.accelerator
    if run.strategy == "fsdp":
        shard_fsdp(objective, model, cfg.distributed, DTYPES[run.plan.compute_precision], acc.device)
    params = [p for p in objective.parameters() if p.requires_grad]
    fused = tc.optim == "adamw_torch_fused" or (acc.device.type == "cuda" and run.strategy != "fsdp")
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=fused or None)
    if run.strategy == "fsdp":
        return objective, optimizer
    return acc.prepare(objective, optimizer)


def describe_loop(cfg: RunConfig, run: Runtime, loop: Loop) -> str:
    tc = cfg.train
    return (f"training: {loop.total_steps} optimizer steps, {loop.steps_per_epoch} per epoch; batch "
            f"{tc.per_device_train_batch_size} x accumulation {tc.gradient_accumulation_steps} x "
            f"{run.accelerator.num_processes} process(es) = global batch {loop.global_batch} ({run.strategy}); "
            f"measured {run.plan.compute_precision} matmul peak {loop.peak_tflops:.3f} TFLOP/s")


def resume(plan_dir: RunDirPlan, run: Runtime, model: torch.nn.Module, loop: Loop) -> TrainingProgress | None:
    """Restore the checkpoint the plan chose (weights, optimizer, schedule, RNG); None for a new run.
    A position at the end of an epoch is moved to the start of the next."""
    if plan_dir.action != "resume":
        return None
    acc = run.accelerator
    saved = read_progress(plan_dir.checkpoint)
    if (note := check_resume_world(saved, acc.num_processes, loop.global_batch, plan_dir.checkpoint)) is not None:
        run.say(f"note: {note}")
    state = load_checkpoint(plan_dir.checkpoint, model, loop.optimizer, loop.scheduler, acc.process_index)
    if state.batch_in_epoch >= loop.micro_per_epoch:
        state = state.model_copy(update={"epoch_index": state.epoch_index + 1, "batch_in_epoch": 0})
    run.say(f"resumed from {plan_dir.checkpoint} at step {state.step} (epoch {state.epoch_index}, "
            f"batch {state.batch_in_epoch})")
    return state


def manifest_of(cfg: RunConfig, run: Runtime, plan_dir: RunDirPlan, model: torch.nn.Module, model_path: str,
                data: Datasets, loop: Loop, step: int, started: str, choices: list[Choice]) -> dict:
    """The run's manifest as it starts: what ran, on what, from which data; status and times follow."""
    trainable, total = count_parameters(model)
    return {
        "run_name": cfg.run_name, "status": "running", "start_time": started, "end_time": None,
        "seed": cfg.seed, "versions": package_versions(), "device": device_summary(),
        "model": {"name_or_path": cfg.model.name_or_path, "resolved": model_path, "revision": cfg.model.revision},
        "method": cfg.method, "objective": cfg.objective, "precision": run.plan.compute_precision,
        "attn_implementation": run.plan.attn_implementation, "kernels": kernels_of(model).as_dict(),
        "batches": {padding_free_batch: "padding-free", packed_batch: "packed"}.get(loop.train_loader.collate_fn,
                                                                                  "padded"),
        "parameters": {"trainable": trainable, "total": total}, "data_files": data.stats["data_files"],
        "data": data.stats, "total_steps": loop.total_steps, "git_commit": git_commit(),
        "resumed": resume_history(Path(cfg.output_dir), plan_dir, step), "matmul_peak_tflops": loop.peak_tflops,
        "distributed": {"strategy": run.strategy, "world_size": run.accelerator.num_processes,
                        "global_batch": loop.global_batch},
        "resolved": {c.key: {"value": c.value, "why": c.why} for c in choices},
    }


def flops_counter(model: torch.nn.Module, method: str) -> Callable[[Window], float | None]:
    """Window -> model FLOPs, for MFU."""
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    return partial(model_flops, config, method)
