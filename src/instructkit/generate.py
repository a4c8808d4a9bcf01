"""Generation with exactly the template the run trained with.

Prompts are rendered and tokenized by the same functions that built the training examples, so the
tokens the model sees at inference are the training prompt tokens.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from instructkit.config import DTYPES
from instructkit.data.collate import pad_batch
from instructkit.data.formats import Message, RowError, prompt_messages
from instructkit.data.sources import read_records
from instructkit.data.templates import Template, render_segments, resolve_template, stop_token_ids
from instructkit.data.tokenize import Example, tokenize_segments
from instructkit.errors import user_error
from instructkit.hardware import resolve_attention, resolve_precision
from instructkit.models import load_pretrained


@dataclass
class Loaded:
    """A model ready to generate, the tokenizer and template it was trained with, and where it came from."""

    model: object
    tokenizer: object
    template: Template
    source: str
    is_adapter: bool


def load_for_inference(run_or_model: str, precision: str = "auto", allow_pickle: bool = False) -> Loaded:
    """Load base (+ adapter) in the inference precision, spread over GPUs when there are several.
    Weights are read from safetensors only unless `allow_pickle`."""
    import torch

    loaded = load_pretrained(run_or_model, DTYPES[resolve_precision(precision)],
                             device_map="auto" if torch.cuda.is_available() else None, allow_pickle=allow_pickle,
                             attn_implementation=resolve_attention("auto"))
    return Loaded(loaded.model, loaded.tokenizer, resolve_template("auto", loaded.tokenizer), str(loaded.source),
                  loaded.is_adapter)


def prompt_example(loaded: Loaded, messages: tuple[Message, ...] | list[Message]) -> Example:
    """Token ids of a prompt, built by the training code path with the generation prompt appended."""
    segments = render_segments(loaded.template, loaded.tokenizer, tuple(messages), add_generation_prompt=True)
    ids, _ = tokenize_segments(segments, loaded.tokenizer)
    return Example(ids, ids)


def generate(loaded: Loaded, prompts: list[tuple[Message, ...]], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
             progress: bool = False) -> list[str]:
    """One completion per prompt: greedy unless temperature > 0; batched with left padding."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    tok = loaded.tokenizer
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tok, loaded.template),
                              pad_token_id=tok.pad_token_id, **sampling)
    device = next(loaded.model.parameters()).device
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    quiet = not progress or len(starts) < 2 or not sys.stderr.isatty()
    for start in tqdm(starts, desc="generate", unit="batch", disable=quiet):
        examples = [prompt_example(loaded, p) for p in prompts[start:start + batch_size]]
        batch = pad_batch(examples, tok.pad_token_id, side="left")
        with torch.no_grad():
            out = loaded.model.generate(input_ids=batch["input_ids"].to(device),
                                        attention_mask=batch["attention_mask"].to(device),
                                        generation_config=config)
        new = out[:, batch["input_ids"].shape[1]:]
        outputs += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    return outputs


def read_prompt_file(path: str) -> tuple[list[dict], list[tuple[Message, ...]]]:
    """Rows of a prompts file and their prompts; a row without a usable prompt names its line."""
    records = read_records([path], "--file")
    prompts = []
    for record in records:
        try:
            prompts.append(prompt_messages(record.data))
        except RowError as exc:
            raise user_error(str(exc), record.where, "give each row an 'instruction' or a 'prompt' string") from exc
    return [r.data for r in records], prompts


def generate_file(loaded: Loaded, in_path: str, out_path: str, **options) -> int:
    """Write each input row plus `output` to out_path (JSONL); returns the row count."""
    rows, prompts = read_prompt_file(in_path)
    outputs = generate(loaded, prompts, progress=True, **options)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as handle:
        for row, output in zip(rows, outputs):
            handle.write(json.dumps({**row, "output": output}, ensure_ascii=False) + "\n")
    return len(rows)


def chat(loaded: Loaded, read: Callable[[str], str], write: Callable[[str], None], system: str | None = None,
         **options) -> None:
    """Multi-turn loop on the generate() path: /reset clears the history, /exit or end of input quits."""
    history: list[Message] = [Message("system", system)] if system else []
    write("Chat with the model. /reset starts over, /exit quits.")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        history.append(Message("user", text))
        reply = generate(loaded, [tuple(history)], **options)[0]
        history.append(Message("assistant", reply))
        write(f"model> {reply}")


def messages_from_cli(prompt: str, context: str | None, system: str | None) -> tuple[Message, ...]:
    head: Iterable[Message] = (Message("system", system),) if system else ()
    return tuple(head) + (Message("user", prompt, context or None),)
