"""Chat with a run's model beside its base model, on the code path of `instructkit chat` and `serve`.

The model is loaded with `load_for_inference` and answers through `generate`, which renders the prompt
with the template the run trained with. The base model answers the same prompt tokens: for a LoRA run the
adapter is switched off (as `eval --baseline` does), for a full fine-tune the base model its manifest
names is loaded. One run's model is kept loaded; asking another replaces it.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path

from instructkit.errors import UserError
from instructkit.studio.security import StudioError

_lock = threading.Lock()  # one generation at a time, and one model in memory
_cache: dict = {}


def _final_stamp(run_dir: Path) -> float:
    final = run_dir / "final"
    return max((p.stat().st_mtime for p in final.iterdir()), default=0.0) if final.is_dir() else 0.0


def _loaded(run_dir: Path):
    from instructkit.generate import load_for_inference

    key = (str(run_dir), _final_stamp(run_dir))
    if _cache.get("key") != key:
        _cache.clear()
        _cache.update(key=key, tuned=load_for_inference(str(run_dir)))
    return _cache["tuned"]


def _base(tuned):
    """A context manager that makes `tuned` answer as its base, and the Loaded to generate with."""
    from instructkit.generate import Loaded, load_for_inference
    from instructkit.models import base_model_of

    if tuned.is_adapter:
        return tuned.model.disable_adapter(), tuned
    if "base" not in _cache:
        base = load_for_inference(base_model_of(tuned.source))
        _cache["base"] = Loaded(base.model, tuned.tokenizer, tuned.template, base.source, False)
    return nullcontext(), _cache["base"]


def _messages(system: str, turns: list[dict], prompt: str, side: str) -> tuple:
    from instructkit.data.formats import Message

    history = [Message("system", system)] if system else []
    for turn in turns:
        history += [Message("user", turn["user"]), Message("assistant", turn.get(side) or "")]
    return tuple(history + [Message("user", prompt)])


def answer(run_dir: Path, name: str, prompt: str, system: str = "", turns: list[dict] | None = None,
           with_base: bool = True, max_new_tokens: int = 128) -> dict:
    """{'tuned': text, 'base': text or None} for the next user turn; each side sees its own earlier answers."""
    from instructkit.generate import generate

    if not (run_dir / "final").is_dir():
        raise StudioError(409, f"run '{name}' has no final/ model yet. Fix: let it finish, or resume it")
    if not prompt.strip():
        raise StudioError(400, "the message is empty. Fix: type a message")
    turns = turns or []
    options = {"max_new_tokens": max(1, min(int(max_new_tokens), 1024))}
    with _lock:
        try:
            tuned = _loaded(run_dir)
            out = {"tuned": generate(tuned, [_messages(system, turns, prompt, "tuned")], **options)[0], "base": None}
            if with_base:
                context, base = _base(tuned)
                with context:
                    out["base"] = generate(base, [_messages(system, turns, prompt, "base")], **options)[0]
        except UserError as exc:
            raise StudioError(400, str(exc)) from None
    return out
