"""encode_texts gives exactly `tokenizer(texts)["input_ids"]`, with and without the template heads it keeps."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from instructkit.data.encode import HeadCache, _cuttable, encode_texts, first_cut

# Letters of several scripts, digits, punctuation, combining marks, every kind of space and line break.
POOL = [chr(c) for c in [*range(0, 0x250), *range(0x300, 0x370), *range(0x2000, 0x2070), 0x3000, 0x4E00, 0x0660,
                         0xFF10, 0x1F600]]
HEADS = ["A:\n", "x\n", "### Instruction:\n", "ab.\n", "\u00e9\n", "1\n", "'\n", "\n", "<|im_start|>user\n",
         "A \n", "x\t\n", "b\n\n"]  # the last three must never be cut off: they end in a longer space run
SPACES = ["a \n  b", "\n \n", " \n\n  c", "x\n   y", "\t\n z", ":\n  q"]  # so the vocabulary merges space runs


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rest = "".join(rng.choice(POOL) for _ in range(rng.randint(0, 10)))
        rest = rng.choice(["", " ", "  ", "\n", "\t"]) + rest if rng.random() < 0.3 else rest
        out.append(rng.choice(HEADS) + rest if rng.random() < 0.7 else rest)
    return out


def _byte_level_bpe(extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A small GPT-2-style tokenizer (byte-level BPE) trained here, with chat special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = _texts(0, 3000) + SPACES * 200 + list(extra) * 50
    corpus += ["Below is an instruction that describes a task.\n\n### Response:\n"] * 50
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def bpe():
    return _byte_level_bpe()


def test_heads_are_cut_only_where_the_pre_tokenizer_ends_a_piece():
    assert first_cut("A:\nb") == 3
    assert first_cut("A:\n b") == 0 and first_cut("A \nb") == 0 and first_cut("A\n\nb") == 0
    assert first_cut("\nb") == 1 and first_cut("ab") == 0 and first_cut("a\n") == 0


def test_encode_texts_equals_the_tokenizer_call(bpe):
    texts = _texts(1, 20000)
    assert _cuttable(bpe.backend_tokenizer)
    for _ in range(2):  # the second pass reads every head from the cache
        assert encode_texts(texts, bpe) == bpe(texts, add_special_tokens=False)["input_ids"]
    from instructkit.data.encode import _HEADS
    assert isinstance(_HEADS[bpe], HeadCache) and "### Instruction:\n" in _HEADS[bpe].ids


@pytest.mark.parametrize("change", ["normalizer", "lstrip", "newline-token", "prefix-space", "dropout"])
def test_other_tokenizers_are_tokenized_whole(change):
    tok = _byte_level_bpe()
    if change == "prefix-space":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif change == "normalizer":
        tok.backend_tokenizer.normalizer = normalizers.NFC()
    elif change == "lstrip":
        tok.add_tokens([AddedToken("<x>", lstrip=True)])
    elif change == "newline-token":
        tok.add_tokens(["\nQ"])
    else:
        tok.backend_tokenizer.model.dropout = 0.5
    assert not _cuttable(tok.backend_tokenizer)
    if change != "dropout":  # dropout is random: nothing equals it
        texts = _texts(2, 2000) + ["<x>\nb", "a\n<x>b", "a:\nQb"]
        assert encode_texts(texts, tok) == tok(texts, add_special_tokens=False)["input_ids"]
