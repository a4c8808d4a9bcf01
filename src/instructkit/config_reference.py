"""Every key of the config (`leaf_fields`, which the studio's form is built from) and the README's config
reference generated from the same walk over the pydantic models (`make readme-reference`; a test checks the
README agrees), so every key a user can set is documented with its default and meaning."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from pydantic import BaseModel

from instructkit.config import RunConfig


def leaf_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted key, its section, the pydantic field) of every leaf key, in the order of the YAML reference."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaf_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", prefix.rstrip("."), field


def reference_rows(model: type[BaseModel] = RunConfig) -> list[tuple[str, str, str]]:
    """(key path, default, description) for every leaf key: the README's config reference."""
    rows = []
    for key, _, field in leaf_fields(model):
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((key, default, field.description or ""))
    return rows


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {m} |" for k, d, m in reference_rows()]
    return "\n".join(lines)
