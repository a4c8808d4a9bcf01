"""Row formats -> one `Conversation`. Nothing downstream knows which format a row came from.

Each converter is a small pure function from a row dict to messages; it raises RowError with a
reason category (used to group the bad-row report) and a detail.
"""

from __future__ import annotations

from dataclasses import dataclass

from instructkit.errors import user_error


@dataclass(frozen=True)
class Message:
    """One turn. `input` is the Alpaca context of a user turn, rendered as its own block where the
    template has one and appended to the content otherwise. Role "text" marks plain text for
    continued pre-training (no template, every token supervised)."""

    role: str
    content: str
    input: str | None = None


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    where: str = ""


class RowError(ValueError):
    """A row that cannot be converted: `reason` groups the report, `detail` says exactly what."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _text(row: dict, key: str, required: bool, label: str | None = None) -> str | None:
    value = row.get(key)
    name = label or f"field '{key}'"
    if value is None:
        if required:
            raise RowError("missing field", f"missing {name}")
        return None
    if not isinstance(value, str):
        raise RowError("wrong type", f"{name} is a {type(value).__name__}, expected a string")
    if required and not value.strip():
        raise RowError("empty field", f"{name} is empty")
    return value


def _system(row: dict) -> tuple[Message, ...]:
    system = _text(row, "system", False)
    return (Message("system", system),) if system else ()


def alpaca(row: dict) -> tuple[Message, ...]:
    """instruction (+ input) -> user turn, output -> assistant turn, optional system prompt."""
    user = Message("user", _text(row, "instruction", True), _text(row, "input", False) or None)
    return _system(row) + (user, Message("assistant", _text(row, "output", True)))


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}


def _turns(row: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> tuple[Message, ...]:
    turns = row.get(key)
    if turns is None:
        raise RowError("missing field", f"missing field '{key}'")
    if not isinstance(turns, list) or not turns:
        raise RowError("wrong type", f"field '{key}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("wrong type", f"{key}[{i}] is a {type(turn).__name__}, expected an object")
        role = _text(turn, role_key, True, f"{key}[{i}].{role_key}")
        if role not in roles:
            raise RowError("unknown role", f"{key}[{i}].{role_key} is '{role}'; expected one of {sorted(roles)}")
        messages.append(Message(roles[role], _text(turn, text_key, True, f"{key}[{i}].{text_key}")))
    return _system(row) + tuple(messages)


def sharegpt(row: dict) -> tuple[Message, ...]:
    """`conversations`: [{from: human|gpt|system, value}], the ShareGPT / Vicuna layout."""
    return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)


def messages(row: dict) -> tuple[Message, ...]:
    """`messages`: [{role: system|user|assistant, content}], the OpenAI layout, multi-turn."""
    return _turns(row, "messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"})


def prompt_completion(row: dict) -> tuple[Message, ...]:
    return _system(row) + (Message("user", _text(row, "prompt", True)),
                           Message("assistant", _text(row, "completion", True)))


def text(row: dict) -> tuple[Message, ...]:
    """Plain text for continued pre-training: every token supervised."""
    return (Message("text", _text(row, "text", True)),)


CONVERTERS = {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages,
              "prompt_completion": prompt_completion, "text": text}
# The keys that identify a format, checked in this order.
SIGNATURES = [("messages", {"messages"}), ("sharegpt", {"conversations"}), ("alpaca", {"instruction", "output"}),
              ("prompt_completion", {"prompt", "completion"}), ("text", {"text"})]


def check_roles(msgs: tuple[Message, ...]) -> None:
    """Optional system first, then user and assistant alternating, ending with an assistant turn."""
    if msgs and msgs[0].role == "text":
        return
    body = msgs[1:] if msgs and msgs[0].role == "system" else msgs
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise RowError("roles out of order", f"turn {i + 1} is '{m.role}' where '{expected}' was expected "
                           "(an optional system turn, then user and assistant alternating)")
    if not body or body[-1].role != "assistant":
        raise RowError("roles out of order", "the conversation does not end with an assistant turn")


def rename_columns(row: dict, columns: dict[str, str] | None) -> dict:
    """Map the format's field names to this data's: {instruction: question} reads row['question']."""
    if not columns:
        return row
    out = dict(row)
    for canonical, actual in columns.items():
        if actual in row:
            out[canonical] = row[actual]
    return out


def detect_format(row: dict, where: str) -> str:
    """The format whose identifying keys the row has. Preference pairs (`chosen` and `rejected`) are checked
    first; a row that also has another format's keys could be either, so it is not guessed."""
    if {"chosen", "rejected"} <= set(row):
        others = [name for name, keys in SIGNATURES if keys <= set(row)]
        if others:
            raise user_error(
                f"the row has the preference keys chosen/rejected and the keys of the {others[0]} format "
                f"({sorted(row)}), so its format cannot be told", where,
                f"set data.format (preference or {others[0]}), or drop the other keys with data.columns")
        return "preference"
    for name, keys in SIGNATURES:
        if keys <= set(row):
            return name
    raise user_error(
        f"cannot tell the data format from the keys {sorted(row)}", where,
        "set data.format, or use the keys of one format (alpaca: instruction/output; sharegpt: conversations; "
        "messages: messages; prompt_completion: prompt/completion; text: text; preference: chosen/rejected with an "
        "optional prompt), or map yours with data.columns")


def to_messages(row: dict, fmt: str) -> tuple[Message, ...]:
    """Convert and check one row; RowError when it is not valid in that format."""
    msgs = CONVERTERS[fmt](row)
    check_roles(msgs)
    return msgs


def prompt_messages(row: dict) -> tuple[Message, ...]:
    """The prompt of a row for generation: alpaca instruction (+ input, system), a preference pair's prompt,
    or a plain `prompt`."""
    if "chosen" in row and "rejected" in row and "instruction" not in row:
        from instructkit.data.preference import to_pair  # preference builds on this module

        return to_pair(row).prompt
    if "instruction" in row:
        return _system(row) + (Message("user", _text(row, "instruction", True), _text(row, "input", False) or None),)
    if "prompt" in row:
        return _system(row) + (Message("user", _text(row, "prompt", True)),)
    raise RowError("missing field", "needs 'instruction' (with optional 'input', 'system') or 'prompt'")
