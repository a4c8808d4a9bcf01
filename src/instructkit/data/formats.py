"""Row formats -> one `Conversation`. Nothing downstream knows which format a row came from."""

from __future__ import annotations

from dataclasses import dataclass

from instructkit.data.sources import Record
from instructkit.errors import UserError

MAX_SHOWN = 5


@dataclass(frozen=True)
class Message:
    """One turn. `input` is the Alpaca context of a user turn, rendered as its own block where the
    template has one and appended to the content otherwise."""

    role: str
    content: str
    input: str | None = None


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    where: str = ""


class RowError(ValueError):
    """A row that cannot be converted; the message is the reason."""


def detect_format(records: list[Record]) -> str:
    """The format of the rows, from the keys of the first one."""
    keys = set(records[0].data)
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise UserError(
        f"{records[0].where}: cannot tell the data format from the keys {sorted(keys)}. "
        "Fix: alpaca rows need 'instruction' and 'output' (and optional 'input', 'system')."
    )


def _text(row: dict, key: str, required: bool) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return None
    if not isinstance(value, str):
        raise RowError(f"field '{key}' is a {type(value).__name__}, expected a string")
    if required and not value.strip():
        raise RowError(f"field '{key}' is empty")
    return value


def alpaca_to_conversation(row: dict) -> tuple[Message, ...]:
    """instruction (+ input) -> user turn, output -> assistant turn, optional system prompt."""
    instruction = _text(row, "instruction", True)
    context = _text(row, "input", False) or None
    output = _text(row, "output", True)
    system = _text(row, "system", False)
    messages = [Message("system", system)] if system else []
    messages += [Message("user", instruction, context), Message("assistant", output)]
    return tuple(messages)


CONVERTERS = {"alpaca": alpaca_to_conversation}


def to_conversations(records: list[Record], fmt: str) -> tuple[list[Conversation], str]:
    """Convert every row; UserError listing the bad rows (count and first examples) if any."""
    if fmt == "auto":
        fmt = detect_format(records)
    convert = CONVERTERS[fmt]
    conversations, bad = [], []
    for record in records:
        try:
            conversations.append(Conversation(convert(record.data), record.where))
        except RowError as exc:
            bad.append(f"  {record.where}: {exc}")
    if bad:
        shown = "\n".join(bad[:MAX_SHOWN]) + (f"\n  ... and {len(bad) - MAX_SHOWN} more" if len(bad) > MAX_SHOWN else "")
        raise UserError(f"{len(bad)} of {len(records)} rows are not valid {fmt} rows:\n{shown}\n"
                        f"Fix: give every row a non-empty string 'instruction' and 'output'.")
    return conversations, fmt


def prompt_messages(row: dict) -> tuple[Message, ...]:
    """The prompt of a row for generation: alpaca instruction (+ input, system), or a plain `prompt`."""
    if "instruction" in row:
        system = _text(row, "system", False)
        head = (Message("system", system),) if system else ()
        return head + (Message("user", _text(row, "instruction", True), _text(row, "input", False) or None),)
    if "prompt" in row:
        return (Message("user", _text(row, "prompt", True)),)
    raise RowError("needs 'instruction' (with optional 'input', 'system') or 'prompt'")
