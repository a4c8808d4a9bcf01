"""Preference pairs: rows -> `PairConversation` -> `PairExample`, a chosen and a rejected answer to one prompt.

Row forms (format `preference`, detected from the keys `chosen` and `rejected`):

- explicit prompt (TRL's convention): `{prompt, chosen, rejected}`, each a string or a list of messages
  `{role, content}`, with an optional `system`; a string prompt may have an `input` beside it, rendered as
  Alpaca's input, so a pair renders exactly like the alpaca row with the same instruction and input;
- implicit prompt: `{chosen, rejected}` as two whole conversations sharing a prefix, lists of messages or
  Anthropic-HH strings ("\\n\\nHuman: ...\\n\\nAssistant: ..."), split at their first differing message,
  which must be an assistant turn: the shared prefix is the prompt.

Both sides are rendered through the same template and tokenized segment by segment, so their prompt tokens
are identical to each other and to what `generate` builds for that prompt. Only the answer turns are
supervised: `data.train_on_inputs` and `data.train_on_turns` do not apply to pairs (a preference objective
compares the log-probabilities of whole answers given the prompt).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from instructkit.data.formats import Message, RowError, _text, check_roles
from instructkit.data.sources import BadRow
from instructkit.data.tokenize import Example, fit_length, tokenize_pairs
from instructkit.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from instructkit.config import DataConfig
    from instructkit.data.templates import Template

ROLES = ("system", "user", "assistant")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
NO_PROMPT_FIX = ("add a 'prompt' field (then chosen and rejected are the answers only), or give them as lists of "
                 "messages or Anthropic-HH dialogues ('\\n\\nHuman: ...\\n\\nAssistant: ...')")


@dataclass(frozen=True)
class PairConversation:
    """A prompt (optional system, then user and assistant alternating, ending with a user turn) and the two
    answers to it (each one or more turns, starting with an assistant turn)."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    where: str = ""

    def segments(self, template: Template, tokenizer: PreTrainedTokenizerBase) -> list[list[tuple[str, bool]]]:
        """The chosen and the rejected side rendered with the prompt; only turns after the prompt supervised."""
        from instructkit.data.templates import render_segments

        n = len(self.prompt)
        return [render_segments(template, tokenizer, self.prompt + side, supervise_from=n)
                for side in (self.chosen, self.rejected)]


@dataclass(frozen=True)
class PairExample:
    """A tokenized pair. `ref` holds the reference model's log-probs of (chosen, rejected) once computed."""

    chosen: Example
    rejected: Example
    where: str = ""
    ref: tuple[float, float] | None = None

    @property
    def n_supervised(self) -> int:
        """The chosen answer's supervised tokens: what the SFT term of ORPO and token counts are about."""
        return self.chosen.n_supervised

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


# --- rows -> PairConversation ------------------------------------------------------------------------------


def _messages(value: list, name: str) -> tuple[Message, ...]:
    """A list of {role, content}; empty contents are checked later, once it is known whose turn it is."""
    if not value:
        raise RowError("wrong type", f"field '{name}' is an empty list")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError("wrong type", f"{name}[{i}] is a {type(turn).__name__}, expected an object "
                           "{role, content}")
        role = _text(turn, "role", True, f"{name}[{i}].role")
        if role not in ROLES:
            raise RowError("unknown role", f"{name}[{i}].role is '{role}'; expected one of {list(ROLES)}")
        content = _text(turn, "content", False, f"{name}[{i}].content")
        if content is None:
            raise RowError("missing field", f"missing {name}[{i}].content")
        out.append(Message(role, content))
    return tuple(out)


def _hh(text: str) -> tuple[Message, ...] | None:
    """The turns of an Anthropic-HH dialogue, or None when the text is not one."""
    text = "\n\n" + text.lstrip("\n")
    if not text.startswith("\n\nHuman:") or "\n\nAssistant:" not in text:
        return None
    parts = HH_TURN.split(text)[1:]  # ['Human', ' hi', 'Assistant', ' hello', ...]
    return tuple(Message(HH_ROLES[role], content.strip()) for role, content in zip(parts[::2], parts[1::2]))


def _answer(value, name: str) -> tuple[Message, ...]:
    """An answer given beside an explicit prompt: a string (one assistant turn) or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty answer", f"field '{name}' is empty")
        return (Message("assistant", value),)
    if not isinstance(value, list):
        raise RowError("wrong type", f"field '{name}' is a {type(value).__name__}, expected a string or a list of "
                       "messages")
    answer = _messages(value, name)
    if answer[0].role != "assistant":
        raise RowError("roles out of order", f"{name}[0] is a '{answer[0].role}' turn; an answer starts with an "
                       "assistant turn (the prompt goes in 'prompt')")
    _check_empty(answer, name, 0, "empty answer")
    return answer


def _check_empty(msgs: tuple[Message, ...], name: str, offset: int, reason: str) -> None:
    for i, m in enumerate(msgs):
        if not m.content.strip():
            raise RowError(reason, f"{name}[{offset + i}].content is empty (a {m.role} turn)")


def _with_system(row: dict, prompt: tuple[Message, ...]) -> tuple[Message, ...]:
    system = _text(row, "system", False)
    if not system:
        return prompt
    if prompt and prompt[0].role == "system":
        raise RowError("conflicting fields", "the row has both a 'system' field and a system turn; keep one")
    return (Message("system", system),) + prompt


def _explicit(row: dict) -> tuple[tuple[Message, ...], tuple[Message, ...], tuple[Message, ...]]:
    value = row["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty field", "field 'prompt' is empty")
        prompt = (Message("user", value, _text(row, "input", False) or None),)
    elif isinstance(value, list):
        prompt = _messages(value, "prompt")
        _check_empty(prompt, "prompt", 0, "empty field")
        if prompt[-1].role != "user":
            raise RowError("roles out of order", f"the prompt ends with a '{prompt[-1].role}' turn; it must end "
                           "with the user turn the answers reply to")
    else:
        raise RowError("wrong type", f"field 'prompt' is a {type(value).__name__}, expected a string or a list of "
                       "messages")
    return _with_system(row, prompt), _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")


def _whole(value, name: str) -> tuple[Message, ...]:
    """One side of an implicit-prompt pair as a whole conversation."""
    if isinstance(value, list):
        return _messages(value, name)
    turns = _hh(value)
    if turns is None:
        raise RowError("no prompt", f"'{name}' is a plain string and the row has no 'prompt' field, so where the "
                       f"prompt ends cannot be told: {NO_PROMPT_FIX}")
    return turns


def _implicit(row: dict) -> tuple[tuple[Message, ...], tuple[Message, ...], tuple[Message, ...]]:
    """Split two whole conversations at their first differing message, which must be an assistant turn."""
    c, r = row["chosen"], row["rejected"]
    for name, value in (("chosen", c), ("rejected", r)):
        if not isinstance(value, (str, list)):
            raise RowError("wrong type", f"field '{name}' is a {type(value).__name__}, expected a string or a list "
                           "of messages")
    if type(c) is not type(r):
        raise RowError("wrong type", f"'chosen' is a {type(c).__name__} and 'rejected' a {type(r).__name__}; give "
                       "both as strings or both as lists of messages")
    chosen, rejected = _whole(c, "chosen"), _whole(r, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise RowError("identical answers", "'chosen' and 'rejected' are the same conversation")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if n == len(side):
            raise RowError("empty answer", f"'{name}' has no turn after the {n} it shares with the other side, so "
                           "its answer is empty")
    if not chosen[n].role == rejected[n].role == "assistant":
        raise RowError("mismatched prompts", f"'chosen' and 'rejected' first differ at turn {n + 1} ("
                       f"{chosen[n].role} / {rejected[n].role}); only the answers after a shared prompt may differ, "
                       "so they must first differ at an assistant turn")
    _check_empty(chosen[:n], "chosen", 0, "empty field")
    _check_empty(chosen[n:], "chosen", n, "empty answer")
    _check_empty(rejected[n:], "rejected", n, "empty answer")
    return _with_system(row, chosen[:n]), chosen[n:], rejected[n:]


def to_pair(row: dict, where: str = "") -> PairConversation:
    """Convert and check one preference row; RowError (reason, exact detail) when it is not a valid pair."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowError("missing field", f"missing field '{key}'")
    prompt, chosen, rejected = _explicit(row) if row.get("prompt") is not None else _implicit(row)
    if chosen == rejected:
        raise RowError("identical answers", "'chosen' and 'rejected' are the same answer")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        try:
            check_roles(prompt + side)
        except RowError as exc:
            raise RowError(exc.reason, f"prompt + {name}: {exc.detail}") from None
    return PairConversation(prompt, chosen, rejected, where)


# --- splitting and tokenizing --------------------------------------------------------------------------------


def split_pairs(pairs: list[PairConversation], n_eval: int, seed: int
                ) -> tuple[list[PairConversation], list[PairConversation]]:
    """A seeded held-out split by prompt: all pairs of a prompt land on one side, so no held-out prompt is
    trained on (a set often has several rejected answers per prompt)."""
    groups: dict[tuple[Message, ...], list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.prompt, []).append(i)
    order = list(groups)
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for prompt in order:
        if len(held) >= n_eval:
            break
        held.update(groups[prompt])
    if len(held) >= len(pairs):
        raise UserError(f"data.val_size holds out {n_eval} of {len(pairs)} pairs, but they share only "
                        f"{len(groups)} prompts, and a prompt's pairs stay together, so none would be left to train "
                        "on. Fix: choose a smaller val_size or give a data.eval_file.")
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def to_pair_examples(pairs: list[PairConversation], tokenizer: PreTrainedTokenizerBase, template: Template,
                     data_cfg: DataConfig) -> tuple[list[PairExample], list[BadRow], dict]:
    """Tokenize both sides and apply the over-length policy to each: a side dropped drops the pair; under
    `error` a pair with a side over max_length is a bad row."""
    eot_id = tokenizer.convert_tokens_to_ids(template.eot_token)
    examples, bad, dropped, truncated = [], [], [], 0
    for pair, sides in zip(pairs, tokenize_pairs(pairs, tokenizer, template, data_cfg.num_proc)):
        longest = max(len(ids) for ids, _ in sides)
        if longest > data_cfg.max_length and data_cfg.overlength == "error":
            which = " and ".join(name for name, (ids, _) in zip(("chosen", "rejected"), sides)
                                 if len(ids) > data_cfg.max_length)
            bad.append(BadRow(pair.where, "over max_length", f"{longest} tokens ({which}), over data.max_length="
                              f"{data_cfg.max_length} (raise it, or set data.overlength to drop or truncate)"))
            continue
        fitted = [fit_length(ids, labels, data_cfg.max_length, data_cfg.overlength, eot_id) for ids, labels in sides]
        if None in fitted:
            dropped.append(pair.where)
            continue
        truncated += longest > data_cfg.max_length
        (c_ids, c_labels), (r_ids, r_labels) = fitted
        examples.append(PairExample(Example(c_ids, c_labels, pair.where), Example(r_ids, r_labels, pair.where),
                                    pair.where))
    return examples, bad, {"rows": len(pairs), "kept": len(examples), "dropped": len(dropped),
                           "truncated": truncated, "dropped_examples": dropped[:5]}
