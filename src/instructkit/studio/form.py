"""The New run form, generated from the pydantic config schema, and its validation.

Every leaf key of RunConfig becomes a field with its type, default and description, grouped by the
sections of the YAML. A field's value is YAML text (so lists, mappings and `null` need no special
widgets); a choice is a select and a flag a checkbox. The config built from the form holds the keys that
differ from their defaults (plus the required ones and the run's name and directory), and is validated
by `RunConfig` with the same messages `instructkit validate` prints (config.format_validation_error).
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from instructkit.config import RunConfig, format_validation_error
from instructkit.config_reference import leaf_fields
from instructkit.studio.security import NAME_PART

SECTION_TITLES = {"": "Run", "model": "Model", "lora": "LoRA", "data": "Data", "train": "Training",
                  "eval": "Evaluation after training", "distributed": "Distributed"}


@dataclass
class FormField:
    key: str
    section: str
    widget: str  # select | checkbox | text
    choices: list[str]
    type_text: str
    default: str  # YAML text; "" for a required key
    description: str
    required: bool


def yaml_text(value: Any) -> str:
    """One value as the YAML a user types: `0.001`, `[q_proj, v_proj]`, `null`, `auto`."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(yaml_text(a) for a in args)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " | ".join(_type_text(a) for a in args)
    if origin is typing.Annotated:
        marks = [c for m in args[1:] for c in getattr(m, "metadata", [m])]  # Field(gt=0) holds Gt(0)
        bounds = [f"{k} {getattr(m, k)}" for m in marks for k in ("gt", "ge", "lt", "le")
                  if getattr(m, k, None) is not None]
        return _type_text(args[0]) + (f" ({', '.join(bounds)})" if bounds else "")
    if annotation is type(None):
        return "null"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation)).replace("DatasetSpec", "{path, weight, ...}")


def _bounds(field: Any) -> str:
    bounds = [f"{k} {getattr(m, k)}" for m in field.metadata for k in ("gt", "ge", "lt", "le")
              if getattr(m, k, None) is not None]
    return f" ({', '.join(bounds)})" if bounds else ""


def schema_fields(model: type[BaseModel] = RunConfig) -> list[FormField]:
    """Every leaf key, in the order of the YAML reference."""
    fields = []
    for key, section, field in leaf_fields(model):
        annotation, required = field.annotation, field.is_required()
        default = "" if required else yaml_text(field.get_default(call_default_factory=True))
        literal = typing.get_origin(annotation) is typing.Literal
        widget = "checkbox" if annotation is bool else "select" if literal else "text"
        choices = [yaml_text(a) for a in typing.get_args(annotation)] if literal else []
        fields.append(FormField(key, section, widget, choices, _type_text(annotation) + _bounds(field),
                                default, field.description or "", required))
    return fields


FIELDS = schema_fields()
BY_KEY = {f.key: f for f in FIELDS}


def sections() -> list[tuple[str, str, list[FormField]]]:
    out: dict[str, list[FormField]] = {}
    for f in FIELDS:
        out.setdefault(f.section, []).append(f)
    return [(name, SECTION_TITLES.get(name, name), fields) for name, fields in out.items()]


def values_from_config(raw: dict) -> dict[str, str]:
    """Form values (YAML text per key) from a config mapping as written (its `auto`s kept)."""
    raw = dict(raw or {})
    if isinstance(raw.get("distributed"), str):
        raw["distributed"] = {"strategy": raw["distributed"]}
    values = {}
    for f in FIELDS:
        node: Any = raw
        for part in f.key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        values[f.key] = f.default if node is KeyError else yaml_text(node)
    return values


def run_dir_text(runs: str, run_name: str) -> str:
    """output_dir as the form fixes it: the run's folder in the studio's runs directory."""
    return (Path(runs) / run_name).as_posix()


@dataclass
class Checked:
    config: dict
    yaml: str
    errors: dict[str, list[dict]]  # key path (or "" for the whole config) -> [{message, fix}]


def _parse(values: dict[str, str], errors: dict) -> dict:
    config: dict = {}
    for f in FIELDS:
        text = (values.get(f.key) or "").strip()
        if not f.required and (text == f.default or text == ""):
            continue  # the default: left out, so the YAML reads like a hand-written one
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            errors.setdefault(f.key, []).append({"message": f"not valid YAML ({problem})",
                                                 "fix": f"write one YAML value of type {f.type_text}"})
            continue
        if value is None and f.required:
            continue  # left out: the validation below says it is required
        node = config
        for part in f.key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[f.key.split(".")[-1]] = value
    return config


def _fix(key: str) -> str:
    f = BY_KEY.get(key)
    if f is None:
        return "see the README's config reference"
    return f"expected {f.type_text}" + (f"; default {f.default}" if f.default else "; it has no default")


def _validation_errors(config: dict, errors: dict) -> None:
    """RunConfig's problems, worded by format_validation_error (what `instructkit validate` prints)."""
    try:
        RunConfig.model_validate(config)
    except ValidationError as exc:
        for line in format_validation_error(exc, "form").splitlines()[1:]:
            key, _, message = line.strip().partition(": ")
            if key == "(top level)":  # a rule between keys: shown at the first key it names
                named = [k for k in re.findall(r"[a-z_]+\.[a-z_]+", message) if k in BY_KEY]
                key = named[0] if named else ""
            errors.setdefault(key, []).append({"message": message, "fix": _fix(key)})


def check(values: dict[str, str], runs: str, root: Path) -> Checked:
    """Build the config from the form and validate it; run_name must also be a free folder name."""
    errors: dict[str, list[dict]] = {}
    name = (values.get("run_name") or "").strip()
    values = {**values, "output_dir": run_dir_text(runs, name)}
    config = _parse(values, errors)
    config["run_name"] = name
    config["output_dir"] = values["output_dir"]
    config = {k: config[k] for k in [f.key.split(".")[0] for f in FIELDS] if k in config}  # schema order
    if not NAME_PART.fullmatch(name):
        errors.setdefault("run_name", []).append({
            "message": f"'{name}' cannot name the run's folder",
            "fix": "use letters, digits, '.', '_' and '-' (it becomes runs/RUN_NAME)"})
    elif (root / name).exists() and any((root / name).iterdir()):
        errors.setdefault("run_name", []).append({
            "message": f"{values['output_dir']} already exists", "fix": "choose another run_name, or open that "
                                                                       "run from the runs list to resume it"})
    _validation_errors(config, errors)
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)
    return Checked(config, text, errors)
