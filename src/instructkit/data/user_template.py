"""The user's own chat template, from a Jinja file or an inline string, checked before any data is tokenized.

Training needs a template whose rendering splits exactly into prompt and response segments, each answer
closed by one end-of-turn token (see templates.render_segments). Builtins are known to; a user template is
therefore rendered once, at resolve time, on probe conversations, turn by turn and through the same code the
data goes through. A failure names the file (or the inline string), the probe turn and the fix, instead of
surfacing later as a puzzling error in the middle of tokenizing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from instructkit.config import TEMPLATE_BUILTINS, TEMPLATE_SUFFIXES
from instructkit.data.formats import Message
from instructkit.data.templates import Template, detect_renders_input, find_eot, render
from instructkit.errors import UserError, user_error

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INLINE = "data.template (inline)"

# Every role, two answers (whether earlier turns render the same once later ones are added only shows from
# the second on), and a single turn whose user message has an Alpaca input.
MULTI_TURN = (Message("system", "probe system text"), Message("user", "probe question one"),
              Message("assistant", "probe answer one"), Message("user", "probe question two"),
              Message("assistant", "probe answer two"))
SINGLE_TURN = (Message("user", "probe question", "probe input"), Message("assistant", "probe answer"))
PROBES = (MULTI_TURN, SINGLE_TURN)

RENDER_FIX = ("make the template render system, user and assistant messages (message['role'], "
              "message['content']) without raising; test it with tokenizer.apply_chat_template")
CONTENT_FIX = "print message['content'] of every message (and message['input'] where the layout has an Input block)"
PREFIX_FIX = ("render each message from that message alone (not from loop.last or messages|length), and let "
              "add_generation_prompt print exactly what the template prints before an assistant message")
EOT_FIX = ("end every assistant message with {{ eos_token }} or another special token of the tokenizer "
           "(such as <|im_end|> where it has one)")


@dataclass(frozen=True)
class _Checking:
    """A template under test and where its errors point."""

    template: Template
    tokenizer: PreTrainedTokenizerBase
    where: str
    is_file: bool

    def at_line(self, line: int | None) -> str:
        if line is None:
            return self.where
        return f"{self.where}:{line}" if self.is_file else f"{self.where}, line {line}"


def load_user_template(spec: str, tokenizer: PreTrainedTokenizerBase) -> Template:
    """A Jinja chat template from a file (name: its path) or an inline string (name: inline), refused with a
    UserError unless it renders the probe conversations in a way training and generation can rely on."""
    name, where, source = _read(spec)
    if not source.strip():
        raise user_error("the template is empty", where, "write a Jinja chat template that renders messages")
    checking = _Checking(Template(name, source, "", detect_renders_input(tokenizer, source)), tokenizer, where,
                         name != "inline")
    answers = [answer for probe in PROBES for answer in _check_probe(checking, probe)]
    return replace(checking.template, eot_token=_end_of_turn(checking, answers))


def _read(spec: str) -> tuple[str, str, str]:
    """(name, where errors point, Jinja source) of an inline string or a template file."""
    if "{{" in spec or "{%" in spec:  # the same rule as config validation
        return "inline", INLINE, spec
    if Path(spec).suffix not in TEMPLATE_SUFFIXES:
        raise user_error(f"{spec!r} is not a template", "data.template",
                         "use auto, a builtin (" + ", ".join(TEMPLATE_BUILTINS) + "), a Jinja file ending in "
                         + " or ".join(TEMPLATE_SUFFIXES) + ", or an inline Jinja string")
    try:
        return spec, spec, Path(spec).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise user_error(f"the template file is not UTF-8 text (byte {e.start} cannot be decoded)", spec,
                         "save the template as UTF-8") from e
    except OSError as e:
        raise user_error(f"the template file cannot be read ({e.strerror or e})", spec,
                         "check the path (relative to the current directory) and its permissions") from e


def _turn(probe: tuple[Message, ...], index: int) -> str:
    roles = ", ".join(m.role for m in probe)
    return f"turn {index + 1} ({probe[index].role}) of the probe conversation [{roles}]"


def _render(checking: _Checking, probe: tuple[Message, ...], end: int, add_generation_prompt: bool,
            first: int | None = None) -> str:
    """probe[:end] rendered. A failure is blamed on the earliest of turns first..end that fails on its own
    (a system message is rendered together with the user turn after it, but may be what the template rejects)."""
    import jinja2

    try:
        return render(checking.template, checking.tokenizer, probe[:end], add_generation_prompt)
    except jinja2.TemplateSyntaxError as e:
        raise user_error(f"Jinja syntax error: {e.message}", checking.at_line(e.lineno),
                         "correct the template's syntax") from e
    except Exception as e:  # raise_exception(), an undefined attribute, a type error: all the template's doing
        culprit, error = end - 1, e
        for j in range(end - 1 if first is None else first, end - 1):
            if (alone := _failure(checking, probe[: j + 1])) is not None:
                culprit, error = j, alone
                break
        raise user_error(f"{_turn(probe, culprit)}: rendering fails with {type(error).__name__}: {error}",
                         checking.where, RENDER_FIX) from e


def _failure(checking: _Checking, messages: tuple[Message, ...]) -> Exception | None:
    try:
        render(checking.template, checking.tokenizer, messages, False)
    except Exception as e:  # noqa: BLE001 - what went wrong is reported, not raised
        return e
    return None


def _divergence(before: str, after: str) -> str:
    """Where two renderings that should share a prefix part, for the error message."""
    k = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    return f"from character {k}: {before[k:k + 40]!r} became {after[k:k + 40]!r}"


def _check_probe(checking: _Checking, probe: tuple[Message, ...]) -> list[tuple[str, Message, str]]:
    """Render `probe` turn by turn the way render_segments will; (turn, message, rendered response) per answer."""
    answers = []
    done, prompt, pending = "", "", []  # rendering through the last answer; prompt for the next; messages since
    for i, message in enumerate(probe):
        turn = _turn(probe, i)
        if message.role != "assistant":
            pending.append(i)
            if i + 1 < len(probe) and probe[i + 1].role != "assistant":
                continue  # rendered with the next message: a prompt always ends before an answer
            prompt = _render(checking, probe, i + 1, True, pending[0])
            if not prompt.startswith(done):
                raise user_error(f"{turn}: adding this turn changes how the earlier turns render "
                                 f"({_divergence(done, prompt)}), so prompt and response cannot be split exactly",
                                 checking.where, PREFIX_FIX)
            _require_content(checking, probe, pending, prompt[len(done):])
            pending = []
            continue
        full = _render(checking, probe, i + 1, False)
        if not full.startswith(prompt):
            raise user_error(f"{turn}: the conversation with this answer does not start with the prompt rendered "
                             f"for it with add_generation_prompt ({_divergence(prompt, full)}), so prompt and "
                             "response cannot be split exactly", checking.where, PREFIX_FIX)
        _require_content(checking, probe, [i], full[len(prompt):])
        answers.append((turn, message, full[len(prompt):]))
        done = full
    return answers


def _require_content(checking: _Checking, probe: tuple[Message, ...], indices: list[int], text: str) -> None:
    """Each message's text must be in its part of the rendering, or the model would never see it."""
    for i in indices:
        for field, value in (("content", probe[i].content), ("input", probe[i].input)):
            if value and value not in text:
                raise user_error(f"{_turn(probe, i)}: the rendering does not contain the message's {field} "
                                 f"({value!r}), so the model would never see it", checking.where, CONTENT_FIX)


def _end_of_turn(checking: _Checking, answers: list[tuple[str, Message, str]]) -> str:
    """The first special token after the first answer (as for a tokenizer's own template), which must be
    one token and must close every answer."""
    turn, message, response = answers[0]
    tail = response[response.rfind(message.content) + len(message.content):]
    eot = find_eot(checking.tokenizer, tail)
    if eot is None:
        raise _no_stop(checking, turn, f"after the answer the template writes {tail!r}, which holds no special "
                       "token of this tokenizer")
    n = len(checking.tokenizer(eot, add_special_tokens=False).input_ids)
    if n != 1:
        raise _no_stop(checking, turn, f"the answer ends with {eot}, which this tokenizer makes {n} tokens")
    for turn, message, response in answers:
        if response.rfind(eot) < response.rfind(message.content) + len(message.content):
            raise _no_stop(checking, turn, f"the answer is not closed with {eot}, the end of turn of the first answer")
    return eot


def _no_stop(checking: _Checking, turn: str, what: str) -> UserError:
    return user_error(f"{turn}: {what}, so the model could not learn to stop", checking.where, EOT_FIX)
