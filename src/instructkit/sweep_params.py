"""The search space of `instructkit sweep`: `--param` parsing, the default space per method, and the
checks that make bad input exit 2 before any trial runs.

A searched key is treated like any `key.path=value` override: it is set in the trial's config with
`apply_overrides` and RunConfig validation decides whether the value is allowed, so a key that also
accepts `auto` (or gains new values later) needs nothing here.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from instructkit.config import RunConfig, apply_overrides, format_validation_error
from instructkit.errors import UserError, user_error

PARAM_FORMS = "KEY=LOW..HIGH, KEY=LOW..HIGH:log or KEY=a,b,c (e.g. train.learning_rate=1e-4..1e-2:log, lora.r=8,16,32)"
# The sweep sets these itself in every trial's config: searching them would break the trial directories,
# or (train.best_metric) rank trials by a metric other than the one they select their weights by.
SWEEP_OWNED = {"run_name", "output_dir", "train.resume", "train.best_metric"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Param:
    """One searched key: a float or int range (optionally log-uniform), or a list of choices."""

    key: str
    kind: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "categorical":
            return ", ".join(map(str, self.choices))
        return f"{self.low}..{self.high}" + (" (log)" if self.log else "") + (" (int)" if self.kind == "int" else "")

    def ends(self) -> tuple[Any, Any]:
        """The two extremes, which are validated before the sweep starts."""
        return (self.choices[0], self.choices[-1]) if self.kind == "categorical" else (self.low, self.high)


def scalar(text: str) -> Any:
    """A YAML scalar, except that `1e-4` is a float (YAML 1.1, which PyYAML reads, needs `1.0e-4`)."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _bound(text: str, param: str) -> int | float:
    value = scalar(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise user_error(f"--param {param}: '{text}' is not a number", fix=f"write {PARAM_FORMS}")
    return value


def parse_param(text: str) -> Param:
    """`key=LOW..HIGH[:log]` (an int range when both bounds are ints) or `key=a,b,c` (YAML scalars)."""
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or not spec:
        raise user_error(f"--param '{text}' is not of the form KEY=RANGE or KEY=CHOICES", fix=f"write {PARAM_FORMS}")
    check_key(key, text)
    if ".." not in spec:
        if spec.endswith(":log"):
            raise user_error(f"--param {text}: ':log' applies to a range LOW..HIGH, not to choices",
                             fix=f"write {PARAM_FORMS}")
        parts = [p.strip() for p in spec.split(",")]
        if any(not p for p in parts):
            raise user_error(f"--param {text}: an empty choice", fix="separate the values with single commas")
        choices = tuple(scalar(p) for p in parts)
        if len(set(map(repr, choices))) < 2:
            raise user_error(f"--param {text}: a search needs at least two different values",
                             fix=f"give more values, or fix the key with an override {key}={parts[0]}")
        if any(not isinstance(c, (str, int, float, bool)) and c is not None for c in choices):
            raise user_error(f"--param {text}: choices must be single values, not lists or mappings",
                             fix="search single values; set lists with an override")
        return Param(key, "categorical", choices=choices)
    log = spec.endswith(":log")
    low_text, _, high_text = spec.removesuffix(":log").partition("..")
    if ":" in high_text:
        raise user_error(f"--param {text}: unknown suffix '{high_text[high_text.index(':'):]}'",
                         fix="the only suffix is ':log' (log-uniform)")
    low, high = _bound(low_text, text), _bound(high_text, text)
    if low >= high:
        raise user_error(f"--param {text}: the range is {'empty' if low == high else 'reversed'} ({low}..{high})",
                         fix="write LOW..HIGH with LOW below HIGH")
    if log and low <= 0:
        raise user_error(f"--param {text}: a log range needs bounds above 0 (got {low})",
                         fix="give a positive LOW, or drop ':log'")
    kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    return Param(key, kind, low, high, log)


def check_key(key: str, text: str | None = None) -> None:
    """The key path names a leaf of the config schema (RunConfig's fields, recursively)."""
    model: type[BaseModel] = RunConfig
    parts = key.split(".")
    where = f"--param {text or key}"
    if key in SWEEP_OWNED:
        raise user_error(f"{where}: the sweep sets {key} itself for each trial",
                         fix="choose it with --metric" if key == "train.best_metric" else "search another key")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        section = ".".join(parts[:i]) or "the top level"
        if field is None:
            raise user_error(f"{where}: '{key}' is not a config key ({section} has no '{part}')",
                             fix="use one of " + ", ".join(model.model_fields) + f" under {section}")
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if is_section and i == len(parts) - 1:
            raise user_error(f"{where}: '{key}' is a section, not a value",
                             fix="name one of its keys: " + ", ".join(f"{key}.{k}" for k in annotation.model_fields))
        if not is_section and i < len(parts) - 1:
            raise user_error(f"{where}: '{'.'.join(parts[:i + 1])}' is a value, not a section",
                             fix=f"search {'.'.join(parts[:i + 1])} itself")
        if is_section:
            model = annotation


def parse_space(texts: list[str]) -> list[Param]:
    """All --param flags; a key given twice is an error."""
    space = [parse_param(t) for t in texts]
    seen: set[str] = set()
    for p in space:
        if p.key in seen:
            raise user_error(f"--param {p.key} is given twice", fix="give each key once")
        seen.add(p.key)
    return space


def default_space(base: dict) -> list[Param]:
    """A sensible space per method: the learning rate (log-uniform around its usual scale), the LoRA rank,
    and the epochs (only when max_steps does not fix the length of the run)."""
    if base["method"] == "lora":
        space = [Param("train.learning_rate", "float", 1e-4, 3e-3, log=True),
                 Param("lora.r", "categorical", choices=(8, 16, 32))]
    else:
        space = [Param("train.learning_rate", "float", 5e-6, 2e-4, log=True)]
    if int(base["train"].get("max_steps") or -1) <= 0:
        space.append(Param("train.num_train_epochs", "int", 1, 3))
    return space


def derived(values: dict[str, Any], space: list[Param], method: str) -> dict[str, Any]:
    """Values that follow from the searched ones: lora.alpha = 2 x lora.r (a scale of 2, as with the usual
    r/alpha pairs) unless alpha is searched itself, so the rank and the update's scale do not move together."""
    keys = {p.key for p in space}
    if method == "lora" and "lora.r" in keys and "lora.alpha" not in keys and isinstance(values.get("lora.r"), int):
        return {"lora.alpha": 2 * values["lora.r"]}
    return {}


def _yaml_value(value: Any) -> str:
    """The override text of a value, read back as the same value (`1.0e-05`, not the string `1e-05`)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def trial_config(base: dict, overrides: dict[str, Any], output_dir: str, run_name: str) -> dict:
    """The base config with the trial's values, its own directory and name, and resume on (a retried trial
    continues from its last checkpoint)."""
    texts = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    texts += [f"output_dir={_yaml_value(output_dir)}", f"run_name={_yaml_value(run_name)}", "train.resume=auto"]
    return apply_overrides(copy.deepcopy(base), texts)


def validate(data: dict, source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)
                        + "\nFix: keep the --param ranges and choices to values the config accepts.") from exc


def validate_space(base: dict, space: list[Param]) -> None:
    """Trial configs at the low ends, with each choice, and at the high ends must all validate, so a bad
    range exits 2 now rather than failing trials later."""
    method = base["method"]
    lows = {p.key: p.ends()[0] for p in space}
    probes = [("the low ends of --param", lows)]
    probes += [(f"--param {p.key}={choice}", {**lows, p.key: choice}) for p in space for choice in p.choices]
    probes.append(("the high ends of --param", {p.key: p.ends()[1] for p in space}))
    for source, values in probes:
        validate(trial_config(base, {**values, **derived(values, space, method)}, "probe", "probe"), source)


def has_eval_data(base: dict) -> bool:
    """Eval data is configured: an eval file, or a held-out split (a number above 0, or `auto`)."""
    data = base.get("data", {})
    return bool(data.get("eval_file")) or data.get("val_size") not in (None, 0, 0.0)
