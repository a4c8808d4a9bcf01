"""Conversation -> input_ids + labels, the mask built segment by segment while tokenizing.

Each rendered segment is tokenized on its own and the pieces are concatenated, so the prompt tokens
of an example are exactly the tokens `generate` builds for the same prompt, and a label is never
derived by subtracting a prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str = ""

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer, train_on_inputs: bool = False
                      ) -> tuple[list[int], list[int]]:
    """Token ids of the concatenated segments, and labels: ids where supervised, IGNORE elsewhere."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in segments:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids += ids
        labels += ids if (supervised or train_on_inputs) else [IGNORE] * len(ids)
    return input_ids, labels


def fit_length(input_ids: list[int], labels: list[int], max_length: int, overlength: str, eot_id: int
               ) -> tuple[list[int], list[int]] | None:
    """Apply the over-length policy: None to drop; a truncated copy that still ends in a supervised
    end-of-turn token (so the model keeps learning to stop); or the input when it fits."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    if overlength == "drop":
        return None
    ids, labs = input_ids[: max_length - 1], labels[: max_length - 1]
    if all(label == IGNORE for label in labs):  # the prompt alone is too long: nothing left to learn
        return None
    return ids + [eot_id], labs + [eot_id]
