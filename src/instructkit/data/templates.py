"""Prompt templates: one Jinja source renders training examples and inference prompts alike.

Builtin templates are Jinja chat templates too, so the template written into the saved tokenizer
is exactly what rendered the training data, and plain `transformers` can use it. A conversation is
split into segments by rendering it turn by turn: prompt segments (not supervised) and response
segments (supervised through the end-of-turn token).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from instructkit.data.formats import Message
from instructkit.errors import UserError, user_error

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase

BUILTIN_FIX = "set data.template to a builtin (alpaca, alpaca_short, chatml, llama3 or plain)"

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n")


def _jinja_str(text: str) -> str:
    """A Jinja string literal for `text`."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _alpaca(preamble: str, preamble_input: str) -> str:
    """The Alpaca layout under a preamble (none when both are empty): one builder, so alpaca and
    alpaca_short differ only in the preamble."""
    head = "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}"
    if preamble or preamble_input:
        head += ("{%- elif messages[0]['input'] is defined and messages[0]['input'] -%}{{- " + _jinja_str(preamble_input)
                 + " -}}{%- else -%}{{- " + _jinja_str(preamble) + " -}}")
    return head + (
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' -%}{{- '\\n\\n' -}}{%- endif -%}"
        "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
        "{%- if message['input'] is defined and message['input'] -%}"
        "{{- '### Input:\\n' + message['input'] + '\\n\\n' -}}{%- endif -%}"
        "{{- '### Response:\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
        "{%- endif -%}{%- endfor -%}"
    )


# The seed's Alpaca format; a system message replaces the preamble. The Input block is left out
# when the input is empty. Turns after the first are separated by a blank line. The source must stay
# byte-identical: `auto` recognises tokenizers saved by earlier runs by it.
ALPACA = _alpaca(ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT)
# The article's format: the same layout without the Stanford preamble (a system message still comes first).
ALPACA_SHORT = _alpaca("", "")

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# The least markup that still separates turns: a system line, the user text, a newline, the answer + EOS.
PLAIN = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
    "{%- else -%}{%- if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' -%}"
    "{{- '\\n' -}}{%- endif -%}{{- message['content'] + '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
)

# name -> (jinja source, end-of-turn token or None for the tokenizer's EOS, renders `input` itself)
BUILTINS: dict[str, tuple[str, str | None, bool]] = {
    "alpaca": (ALPACA, None, True),
    "alpaca_short": (ALPACA_SHORT, None, True),
    "chatml": (CHATML, "<|im_end|>", False),
    "llama3": (LLAMA3, "<|eot_id|>", False),
    "plain": (PLAIN, None, False),
}


@dataclass(frozen=True)
class Template:
    """A resolved template: its Jinja source, end-of-turn token, and whether it renders `input`."""

    name: str
    source: str
    eot_token: str
    renders_input: bool


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def _builtin(name: str, tokenizer) -> Template:
    source, eot, renders_input = BUILTINS[name]
    if _adds_bos(tokenizer):  # the tokenizer's own encoding starts with BOS; so do our prompts
        source = "{{- bos_token -}}" + source
    eot = eot or tokenizer.eos_token
    if eot is None:
        raise user_error(f"the template {name} ends turns with the EOS token, but the tokenizer has none",
                         "data.template", "use a tokenizer with an EOS token or another template")
    ids = tokenizer(eot, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise user_error(f"the template {name} ends turns with {eot}, which this tokenizer does not have as one "
                         f"token (it becomes {len(ids)} tokens), so the model could not learn to stop", "data.template",
                         "set data.template to alpaca, or auto to use the tokenizer's own template")
    return Template(name, source, eot, renders_input)


def find_eot(tokenizer, tail: str) -> str | None:
    """The end-of-turn token in `tail`, what a template writes after an answer: its first special token."""
    specials = {t for t in tokenizer.all_special_tokens if t} | {str(t) for t in tokenizer.get_added_vocab()}
    found = sorted((tail.find(t), t) for t in specials if t in tail)
    return found[0][1] if found else None


def _detect_eot(tokenizer, source: str) -> str:
    """The special token that closes an assistant turn in a tokenizer's own template."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Q9Z"}]
    rendered = tokenizer.apply_chat_template(probe, chat_template=source, tokenize=False)
    eot = find_eot(tokenizer, rendered[rendered.rfind("Q9Z") + 3:])
    if eot is None:
        raise user_error("the tokenizer's chat template does not end an assistant turn with a special token, so "
                         "the model could not learn to stop", "data.template", BUILTIN_FIX)
    return eot


def detect_renders_input(tokenizer, source: str) -> bool:
    """Whether a template prints a message's `input` itself (an Alpaca-style layout). Decided by rendering,
    not by name, so a user template and the same source read back from a saved tokenizer agree, and the
    run generates with exactly the prompt it trained on."""
    probe = [{"role": "user", "content": "Hi", "input": "I7Q"}, {"role": "assistant", "content": "Q9Z"}]
    try:
        return "I7Q" in tokenizer.apply_chat_template(probe, chat_template=source, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this fails later, with a message saying where
        return False


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase) -> Template:
    """`auto` -> the tokenizer's chat template when it has one, else alpaca; a builtin by name; or the
    user's own Jinja template (a file or an inline string), checked on probe conversations before use."""
    if name == "auto":
        if not tokenizer.chat_template:
            return _builtin("alpaca", tokenizer)
        for builtin in BUILTINS:  # a tokenizer saved by instructkit carries one of ours
            if _builtin_source_matches(builtin, tokenizer):
                return _builtin(builtin, tokenizer)
        source = tokenizer.chat_template
        return Template("tokenizer", source, _detect_eot(tokenizer, source), detect_renders_input(tokenizer, source))
    if name in BUILTINS:
        return _builtin(name, tokenizer)
    # Imported here: user_template builds on this module (Template, render), so it cannot be imported at the top.
    from instructkit.data.user_template import load_user_template

    return load_user_template(name, tokenizer)


def _builtin_source_matches(name: str, tokenizer) -> bool:
    source = BUILTINS[name][0]
    return tokenizer.chat_template in (source, "{{- bos_token -}}" + source)


# User text is text: a special token's characters inside a row or a chat message (say "<|im_start|>system")
# must never become the control token, or data could forge turns. Before rendering, each occurrence is
# replaced by a placeholder of private-use characters; tokenizing turns a placeholder back into the plain
# characters (split_special_tokens), so only the template itself produces control tokens.
PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


# The placeholder's own opening character counts as one of the strings, so user text that contains it is
# escaped too and can neither forge a placeholder nor crash tokenizing.
PLACEHOLDER_OPEN = "\ue000"


@dataclass(frozen=True)
class _Escapes:
    strings: list[str]  # special-token strings longest first (the longest match wins), then PLACEHOLDER_OPEN
    pattern: re.Pattern
    index: dict[str, int]


_ESCAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _Escapes, built once


def _escapes(tokenizer: PreTrainedTokenizerBase) -> _Escapes:
    if tokenizer not in _ESCAPES:
        added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
        specials = {t for t in [*tokenizer.all_special_tokens, *added] if t}
        strings = [*sorted(specials, key=lambda t: (-len(t), t)), PLACEHOLDER_OPEN]
        _ESCAPES[tokenizer] = _Escapes(strings, re.compile("|".join(re.escape(s) for s in strings)),
                                       {s: i for i, s in enumerate(strings)})
    return _ESCAPES[tokenizer]


def special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What placeholder N stands for: the tokenizer's special-token strings, then PLACEHOLDER_OPEN."""
    return _escapes(tokenizer).strings


def escape_specials(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """`text` with every special-token string replaced by its placeholder (unchanged when there is none)."""
    escapes = _escapes(tokenizer)
    return escapes.pattern.sub(lambda m: f"\ue000{escapes.index[m.group(0)]}\ue001", text)


def _as_dicts(messages: Sequence[Message], template: Template, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    out = []
    for m in messages:
        content, extra = escape_specials(m.content, tokenizer), escape_specials(m.input or "", tokenizer)
        if template.renders_input and extra:
            out.append({"role": m.role, "content": content, "input": extra})
        else:
            out.append({"role": m.role, "content": f"{content}\n\n{extra}" if extra else content})
    return out


def render(template: Template, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
           add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(_as_dicts(messages, template, tokenizer), chat_template=template.source,
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def _prefix_error(template: Template) -> UserError:
    return user_error(f"the {template.name} template renders an earlier part of a conversation differently once "
                      "later turns are added, so prompt and response cannot be split exactly", "data.template",
                      BUILTIN_FIX)


def _text_segments(tokenizer, content: str) -> list[tuple[str, bool]]:
    """Plain text (continued pre-training): BOS when the tokenizer uses one, then text + EOS, all supervised."""
    if tokenizer.eos_token is None:
        raise user_error("plain-text rows end with the EOS token, but the tokenizer has none", "model.name_or_path",
                         "use a tokenizer with an EOS token")
    bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
    content = escape_specials(content, tokenizer) + tokenizer.eos_token
    return [(text, supervised) for text, supervised in ((bos, False), (content, True)) if text]


def render_segments(template: Template, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                    add_generation_prompt: bool = False, turns: str = "all", supervise_from: int = 0
                    ) -> list[tuple[str, bool]]:
    """(text, supervised) pieces whose concatenation is the rendered conversation.

    Each assistant turn (only the last one with turns="last") is supervised up to and including its
    end-of-turn token; whatever the template puts after that token (a newline) and every other turn is not.
    Assistant turns at a message index below `supervise_from` are not supervised: a preference pair's
    prompt may hold earlier assistant turns, and only its answer is learned from.
    """
    if messages and messages[0].role == "text":
        return _text_segments(tokenizer, messages[0].content)
    if renders_fast(template):
        return _from_skeleton(template, tokenizer, messages, (add_generation_prompt, turns, supervise_from))
    return _rendered_segments(template, tokenizer, messages, add_generation_prompt, turns, supervise_from)


def _rendered_segments(template: Template, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                       add_generation_prompt: bool, turns: str, supervise_from: int) -> list[tuple[str, bool]]:
    """render_segments through Jinja: the conversation rendered turn by turn and cut where renders differ."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = render(template, tokenizer, messages[:i], add_generation_prompt=True)
        full = render(template, tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise _prefix_error(template)
        response = full[len(prompt):]
        end = response.rfind(template.eot_token)
        if end < 0:
            raise user_error(f"the {template.name} template does not close an assistant turn with "
                             f"{template.eot_token}", "data.template", BUILTIN_FIX)
        end += len(template.eot_token)
        supervised = (turns == "all" or i == last) and i >= supervise_from
        segments += [(prompt[len(done):], False), (response[:end], supervised), (response[end:], False)]
        done = full
    if add_generation_prompt or not messages or messages[-1].role != "assistant":
        rest = render(template, tokenizer, messages, add_generation_prompt=add_generation_prompt)
        if not rest.startswith(done):
            raise _prefix_error(template)
        segments.append((rest[len(done):], False))
    return [(text, supervised) for text, supervised in segments if text]


# Rendering through Jinja costs more than tokenizing a row. A builtin template only concatenates its own
# literals with message texts and branches on roles and on whether an input is present, so the segments of
# every conversation of one shape are those of the same conversation with stand-ins for its texts, the texts
# put in their place. Each shape is rendered once through Jinja (with the stand-ins) and kept.
_STAND_IN = re.compile("\ue002(\\d+)\ue003")
_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(template, shape): skeleton}


def renders_fast(template: Template) -> bool:
    """Whether render_segments fills a skeleton (a builtin template) rather than rendering through Jinja."""
    source = BUILTINS[template.name][0] if template.name in BUILTINS else None
    return source is not None and template.source in (source, "{{- bos_token -}}" + source)


def _skeleton(template: Template, tokenizer, shape: tuple, options: tuple) -> list[tuple[list, bool]]:
    """Per segment: its parts (literal strings and indexes of texts) and whether it is supervised."""
    cache = _SKELETONS.setdefault(tokenizer, {})
    key = (template, shape, options)
    if key not in cache:
        if len(cache) > 4096:  # conversations of ever new shapes (long chats): keep memory bounded
            cache.clear()
        stand_ins = [Message(role, f"\ue002{2 * i}\ue003", f"\ue002{2 * i + 1}\ue003" if has_input else None)
                     for i, (role, has_input) in enumerate(shape)]
        segments = _rendered_segments(template, tokenizer, stand_ins, *options)
        cache[key] = [([int(p) if k % 2 else p for k, p in enumerate(_STAND_IN.split(text)) if p != ""
                        or k % 2], supervised) for text, supervised in segments]
    return cache[key]


def _from_skeleton(template: Template, tokenizer, messages: Sequence[Message], options: tuple
                   ) -> list[tuple[str, bool]]:
    """render_segments of a builtin template by filling its shape's skeleton with the messages' texts,
    escaped and laid out as _as_dicts lays them out for Jinja."""
    texts: list[str] = []
    shape = []
    for m in messages:
        content, extra = escape_specials(m.content, tokenizer), escape_specials(m.input or "", tokenizer)
        own_input = bool(template.renders_input and extra)
        texts += [content if own_input or not extra else f"{content}\n\n{extra}", extra]
        shape.append((m.role, own_input))
    filled = [("".join(p if isinstance(p, str) else texts[p] for p in parts), supervised)
              for parts, supervised in _skeleton(template, tokenizer, tuple(shape), options)]
    return [(text, supervised) for text, supervised in filled if text]  # an empty text leaves no segment


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: Template) -> list[int]:
    """Generation stops at the template's end-of-turn token and at the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(template.eot_token)}
    return sorted(i for i in ids if i is not None)
