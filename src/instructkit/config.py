"""The run configuration: pydantic models of one YAML file, validated at load.

Names follow Hugging Face `TrainingArguments` so users meet what they know. Every model rejects
unknown keys, and `load_config` reports every problem at once with its key path and a fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from instructkit.errors import UserError, user_error


def instructkit_home() -> Path:
    """Cache root for converted models and tokenized data (INSTRUCTKIT_HOME, else ~/.cache/instructkit)."""
    return Path(os.environ.get("INSTRUCTKIT_HOME") or "~/.cache/instructkit").expanduser()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name_or_path: str = Field(
        description="builtin alias (smollm2-135m-instruct), a local Hugging Face model directory, "
        "a hub id (from the local cache, or downloaded where the network allows; token from HF_TOKEN), or a run "
        "directory (runs/NAME: its final/ model, or its LoRA adapter trained on, with the template it trained with)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp16 on older GPUs; on a CPU bf16 where a bf16 "
        "matmul measures at least 1.3x faster than fp32 at start, else fp32")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa; on a CPU "
        "sdpa_instructkit_cpu: sdpa, with packed examples attended one by one and, in bf16, small attention as matmuls"
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="fused GPU kernels: liger applies Liger Kernel's RMSNorm, RoPE, SwiGLU and fused linear "
        "cross entropy (on the supervised rows only) and exits 2 where it cannot run; auto: liger where liger-kernel "
        "is installed, CUDA is present and the architecture is supported, else none (the reason is printed)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    trust_remote_code: bool = Field(False, description="allow model code from the model's repository")
    load_in_4bit: bool = Field(False, description="QLoRA: 4-bit NF4 base weights (needs CUDA and bitsandbytes)")
    revision: Union[str, None] = Field(
        None, description="hub revision; with trust_remote_code a hub model needs a 40-hex commit hash here")
    allow_pickle: bool = Field(
        False, description="allow .bin/.pt weights, which are unpickled (code can run); default safetensors only")


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, description="rank of the LoRA update")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input (above 0, peft copies and "
                           "masks every adapted layer's input: 0.05 trained SmolLM2 1.5x slower on one CPU, 6% on another)")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or all-linear: every linear "
        "layer but the output head (as QLoRA and LLaMA-Factory's lora_target: all)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (passed to peft)")


# Precision names of the config -> torch dtype names.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The label of a position that is never supervised (PyTorch cross-entropy's ignore_index).
IGNORE = -100

# Builtin template names (their sources live in data/templates.py) and the suffixes of template files.
TEMPLATE_BUILTINS = ("alpaca", "alpaca_short", "chatml", "llama3", "plain")
TEMPLATE_SUFFIXES = (".jinja", ".j2", ".jinja2")

Format = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference"]
# Objectives that train on preference pairs (a chosen and a rejected answer to one prompt).
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")


class DatasetSpec(_Strict):
    path: str = Field(description="a file, glob, directory or hub dataset id")
    weight: float = Field(1.0, gt=0, description="rows taken = weight x rows (below 1 samples, above 1 repeats)")
    format: Union[Format, None] = Field(None, description="this source's format; null: data.format")
    columns: Union[dict[str, str], None] = Field(None, description="this source's column mapping; null: data.columns")
    split: str = Field("train", description="split of a hub dataset")


Sources = Union[str, list[Union[str, DatasetSpec]]]


def _specs(value: "Sources | None") -> list[DatasetSpec]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    return [DatasetSpec(path=item) if isinstance(item, str) else item for item in items]


class DataConfig(_Strict):
    train_file: Sources = Field(
        description="a file (.jsonl .json .csv .parquet), glob, directory or hub dataset id, or a list of "
        "them; list items may be {path, weight, format, columns, split} to mix datasets")
    eval_file: Union[Sources, None] = Field(None, description="held-out data for eval loss, same forms")
    val_size: Union[Literal["auto"], Annotated[float, Field(ge=0.0)]] = Field(
        "auto", description="split off eval data from train: a fraction < 1, or a row count >= 1; auto: 5% "
        "(20..1000 rows) when there is no eval_file and at least 200 rows, else none")
    format: Format = Field("auto", description="row format; auto detects it per source and says which")
    columns: Union[dict[str, str], None] = Field(
        None, description="rename columns to the format's names, e.g. {instruction: question, output: answer}")
    template: str = Field(
        "auto", description="prompt template: auto (the tokenizer's chat template, else alpaca), a builtin "
        "(alpaca, alpaca_short, chatml, llama3, plain), a Jinja chat template file (.jinja, .j2) or an inline "
        "Jinja string")
    max_length: int = Field(512, ge=8, description="maximum tokens of one example")
    train_on_inputs: bool = Field(False, description="also supervise prompt tokens")
    train_on_turns: Literal["all", "last"] = Field("all", description="which assistant turns are supervised")
    overlength: Literal["drop", "truncate", "error"] = Field(
        "drop", description="what to do with examples longer than max_length (truncate keeps the EOS)")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop before training with the report; skip: train on the rest")
    max_bad_fraction: float = Field(0.1, ge=0, le=1, description="with skip, stop anyway above this share of bad rows")
    packing: bool = Field(False, description="pack examples into rows of max_length, each attending only to itself")
    padding_free: Union[Literal["auto"], bool] = Field(
        "auto", description="each micro-batch's examples in one row without padding, each attending only to itself "
        "(the same examples and loss as padded batches); auto: on where attention runs example by example (the CPU "
        "attention path); checked on the model first")
    num_proc: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        "auto", description="cores for tokenizing: auto (every core this process may use, at most 8, in "
        "threads); N: N threads, or N spawned processes where the template renders through Jinja (not a builtin)")
    cache: bool = Field(True, description="cache tokenized data on disk, keyed by content, tokenizer and settings")

    @field_validator("template")
    @classmethod
    def _template_spec(cls, value: str) -> str:
        if value == "auto" or value in TEMPLATE_BUILTINS or "{{" in value or "{%" in value:
            return value
        if Path(value).suffix in TEMPLATE_SUFFIXES:
            if not Path(value).is_file():
                raise ValueError(f"template file not found: {value} (paths are relative to the current directory)")
            return value
        raise ValueError("not a template: use auto, a builtin (" + ", ".join(TEMPLATE_BUILTINS) + "), a Jinja "
                         "file ending in " + " or ".join(TEMPLATE_SUFFIXES) + ", or an inline Jinja string")

    @property
    def train_specs(self) -> list[DatasetSpec]:
        return _specs(self.train_file)

    @property
    def eval_specs(self) -> list[DatasetSpec]:
        return _specs(self.eval_file)


class TrainConfig(_Strict):
    per_device_train_batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    per_device_eval_batch_size: int = Field(8, ge=1, description="examples per eval batch")
    gradient_accumulation_steps: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        "auto", description="micro-batches per optimizer step; auto: a global batch of about 8 below 4,000 "
        "examples, 16 below 40,000, else 32")
    learning_rate: Union[Literal["auto"], Annotated[float, Field(gt=0)]] = Field(
        "auto", description="peak learning rate; auto: 1e-3 for LoRA, 5e-5 for full tuning below 1B parameters, "
        "else 2e-5")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    num_train_epochs: Union[Literal["auto"], Annotated[float, Field(gt=0)]] = Field(
        "auto", description="passes over the training data; auto: enough to train on about 1,000 examples, "
        "1 to 3")
    max_steps: int = Field(-1, description="optimizer steps; overrides num_train_epochs when > 0")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="share of steps spent warming up")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warmup")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 disables")
    optim: Literal["adamw_torch", "adamw_torch_fused"] = Field(
        "adamw_torch", description="AdamW; fused kernels are used on CUDA either way, adamw_torch_fused asks for them on CPU too")
    logging_steps: int = Field(10, ge=1, description="optimizer steps between log lines")
    eval_steps: Union[Literal["auto"], Annotated[int, Field(ge=1)], None] = Field(
        "auto", description="optimizer steps between eval-loss runs; auto: about 4 per epoch; null: at each "
        "epoch end")
    final_weights: Literal["best", "last"] = Field(
        "best", description="what final/ holds: best (the weights of the best evaluation by train.best_metric, "
        "when there is eval data) or last")
    best_metric: Literal["auto", "eval_loss", "eval_exact_match", "eval_accuracy", "eval_pref_accuracy"] = Field(
        "auto", description="what chooses the best weights and early stopping: eval_loss (lowest), "
        "eval_exact_match (teacher-forced: examples whose every answer token is predicted), eval_accuracy "
        "(answer tokens predicted), eval_pref_accuracy (preference objectives: pairs ranked right); auto: "
        "eval_exact_match when eval answers are short (median <= 32 tokens), else eval_loss (always eval_loss "
        "for preference objectives)")
    early_stopping_patience: Union[Annotated[int, Field(ge=1)], None] = Field(
        None, description="stop after this many evaluations without a better train.best_metric; null: never (on "
        "small eval splits early stopping ends runs on noise)")
    # YAML 1.1 reads an unquoted `no` as false (`save_strategy: no`, `train.save_strategy=no`)
    save_strategy: Annotated[Literal["steps", "epoch", "no"], BeforeValidator(lambda v: "no" if v is False else v)] = (
        Field("epoch", description="when to checkpoint"))
    save_steps: int = Field(500, ge=1, description="optimizer steps between checkpoints (save_strategy: steps)")
    save_total_limit: Union[int, None] = Field(2, ge=1, description="checkpoints kept; null keeps all")
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=lambda: ["tensorboard"], description="extra metric sinks; [] for none")
    resume: Union[Literal["auto"], Literal[False], str] = Field(
        "auto", description="auto: continue from the newest complete checkpoint in output_dir; "
        "false: never reuse a non-empty output_dir; or a checkpoint directory to resume from")
    dataloader_num_workers: int = Field(0, ge=0, description="worker processes that build batches")
    group_by_length: bool = Field(
        False, description="batch examples of similar length together (less padding; seeded, resumable)")
    compile: bool = Field(False, description="torch.compile the decoder (minutes of compiling first; for long runs)")
    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms and CUBLAS_WORKSPACE_CONFIG (slower on GPU)")
    ddp_timeout: int = Field(
        1800, ge=10, description="seconds a collective (all-reduce, barrier) may wait for the other processes")


class DistributedConfig(_Strict):
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="auto: ddp when launched on several processes; fsdp: FSDP2 sharding; "
        "deepspeed: ZeRO through accelerate (CUDA only). `distributed: fsdp` is short for this key")
    fsdp_sharding: Literal["full", "hybrid"] = Field(
        "full", description="full: shard over all processes; hybrid: shard within a node, replicate across nodes")
    fsdp_cpu_offload: bool = Field(False, description="keep sharded parameters and optimizer state in CPU memory")
    fsdp_state_dict: Literal["full", "sharded"] = Field(
        "full", description="checkpoints: full (gathered on rank 0) or sharded (one file per rank, same world "
        "size to resume); final/ is always a full, loadable model")
    deepspeed_config: str = Field(
        "zero2", description="builtin zero2 | zero3 | zero3-offload, or the path of a DeepSpeed JSON config")


class PreferenceConfig(_Strict):
    beta: Union[Literal["auto"], Annotated[float, Field(gt=0)]] = Field(
        "auto", description="strength of the preference term; auto: 0.1 for dpo (the DPO paper) and orpo "
        "(the ORPO paper's lambda), 2.0 for simpo (the SimPO paper's range)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo and simpo: the assumed share of pairs whose labels are flipped "
        "(conservative DPO); 0 is the plain loss")
    gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin")
    nll_weight: Union[Literal["auto"], Annotated[float, Field(ge=0)]] = Field(
        "auto", description="dpo and simpo: add the chosen answer's NLL per token times this weight (RPO), which "
        "keeps chosen answers likely; auto: 1.0 for dpo (measured: bench/preference.py), 0 for simpo (its "
        "paper's loss); orpo always has it with weight 1")


class EvalConfig(_Strict):
    generate: bool = Field(
        False, description="after training, generate for the eval data and score exact match and ROUGE-L")
    baseline: bool = Field(True, description="with generate, also score the base model on the same prompts")
    max_samples: int = Field(64, ge=1, description="eval rows scored after training")
    max_new_tokens: int = Field(64, ge=1, description="tokens generated per eval row")


class RunConfig(_Strict):
    run_name: str = Field("run", min_length=1, description="a name for the run")
    output_dir: Union[str, None] = Field(None, description="run directory; null: runs/RUN_NAME")
    seed: int = Field(42, description="seed for data order, dropout and initialisation")
    model: ModelConfig
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapter or full fine-tuning")
    objective: Literal["sft", "dpo", "orpo", "simpo"] = Field(
        "sft", description="sft: supervised on demonstrations; dpo, orpo, simpo: preference tuning on pairs "
        "{prompt, chosen, rejected} (dpo against the starting model as reference; orpo and simpo need none)")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="before")
    @classmethod
    def _distributed_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("distributed"), str):
            data = {**data, "distributed": {"strategy": data["distributed"]}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.output_dir is None:
            self.output_dir = f"runs/{self.run_name}"
        if self.model.load_in_4bit and self.method != "lora":
            raise ValueError("model.load_in_4bit needs method: lora (4-bit weights cannot be trained directly)")
        val = self.data.val_size
        has_eval = bool(self.data.eval_specs) or val == "auto" or val > 0
        if self.data.eval_specs and val != "auto" and val > 0:
            raise ValueError("set data.eval_file or data.val_size, not both")
        if self.eval.generate and not has_eval:
            raise ValueError("eval.generate needs eval data: set data.eval_file or data.val_size")
        if isinstance(self.train.eval_steps, int) and not has_eval:
            raise ValueError("train.eval_steps is set but there is no eval data: set data.eval_file or data.val_size")
        if self.distributed.strategy == "deepspeed" and self.train.save_strategy != "no":
            raise ValueError("distributed: deepspeed keeps its optimizer state inside DeepSpeed, which instructkit's "
                             "safetensors checkpoints cannot hold: set train.save_strategy: no, or use distributed: "
                             "fsdp (sharding like ZeRO-3, with resumable checkpoints)")
        if self.train.best_metric in ("eval_exact_match", "eval_accuracy") and self.objective != "sft":
            raise ValueError(f"train.best_metric: {self.train.best_metric} is measured on demonstrations; with "
                             f"objective: {self.objective} use eval_loss, eval_pref_accuracy or auto")
        if self.train.best_metric == "eval_pref_accuracy" and self.objective == "sft":
            raise ValueError("train.best_metric: eval_pref_accuracy needs a preference objective (dpo, orpo, simpo)")
        if self.eval.generate and self.objective != "sft":
            raise ValueError(f"eval.generate scores generations against references, which preference pairs are "
                             f"not; with objective: {self.objective} set it to false and run "
                             "`instructkit eval RUN --data PAIRS` (ranking accuracy) or --data on demonstrations")
        for key, on in (("data.packing", self.data.packing), ("data.padding_free", self.data.padding_free is True)):
            if on and self.objective != "sft":  # auto simply pads them
                raise ValueError(f"{key} with objective: {self.objective}: preference pairs are not packed "
                                 f"(each side is scored as a whole sequence); set {key}: false")
        if self.data.packing and self.data.padding_free is True:
            raise ValueError("data.padding_free: true with data.packing: packed rows hold no padding already; set "
                             "data.padding_free: auto, or data.packing: false")
        if self.distributed.strategy == "fsdp" and self.model.load_in_4bit:
            raise ValueError("distributed: fsdp with model.load_in_4bit is not supported: use ddp for QLoRA")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into a key path and a YAML-typed value (`1e-4` -> float, `[x]` -> list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise user_error(
            f"the override '{text}' is not of the form key.path=value", fix="write e.g. train.learning_rate=1e-4"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted override in a nested dict (unknown keys are caught by validation)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise user_error(f"override '{text}': '{part}' is not a section", fix="check the key path")
            node = child
        node[path[-1]] = value
    return data


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise user_error(f"config file not found: {path}", fix="check the path (relative to the current directory)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise user_error(f"not valid YAML ({exc.problem})", where, "fix the YAML syntax at that line") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise user_error(f"not a readable YAML file ({exc})", str(path), "save it as UTF-8 YAML") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise user_error("the config must be a mapping of keys to values", str(path), "see the README's config reference")
    return data


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _key_path(loc: tuple) -> str:
    """`lora.target_modules`, without the union-member tags pydantic adds (`list[str]`, `literal[...]`)."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    parts = [p for p in parts if "[" not in p and p not in ("str", "int", "float", "bool", "none")
             and not p.startswith("constrained-")]
    return ".".join(parts) or "(top level)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """All problems at once, one line per key: `key.path: what (fix)`."""
    problems: dict[str, list[str]] = {}
    for err in exc.errors():
        kind = err["type"]
        if kind == "extra_forbidden":
            hint = "unknown key; allowed here: " + ", ".join(_allowed_keys(err["loc"]))
        elif kind == "missing":
            hint = "required key is missing; add it"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            hint = f"{msg} (got {given!r})" if given is not None and not isinstance(given, dict) else msg
        hints = problems.setdefault(_key_path(err["loc"]), [])
        if hint not in hints:
            hints.append(hint)
    lines = [f"  {key}: {' -- or: '.join(hints)}" for key, hints in problems.items()]
    return f"{source}: invalid config ({len(lines)} problem{'s' if len(lines) > 1 else ''}):\n" + "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raises UserError listing every problem."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path), overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, str(path))) from exc


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, in field order, loadable by `load_config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
