"""How a token is written at the start of a line: a word inside a passage carries the space before it (" Lucia"),
but an answer's first word follows a line break and is written without one ("Lucia"). The copy pointer and
extractive decoding both need the one form from the other."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def token_texts(tokenizer, vocab_size: int) -> tuple[str, ...]:
    """Each token's text on its own; decoded once per tokenizer (the pointer's tables and extractive decoding's)."""
    return tuple(tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))],
                                        clean_up_tokenization_spaces=False))


def line_start_forms(tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the vocabulary (vocab_size ids): each token's id without its leading space (its own id if it has no
    leading space or the vocabulary lacks that form), and whether a token ends a line."""
    texts = token_texts(tokenizer, vocab_size)
    id_of: dict[str, int] = {}
    for token, text in enumerate(texts):
        id_of.setdefault(text, token)
    unspaced = torch.arange(vocab_size)
    ends_line = torch.zeros(vocab_size, dtype=torch.bool)
    for token, text in enumerate(texts):
        if len(text) > 1 and text[0] == " " and "\ufffd" not in text:  # not a piece of a UTF-8 character
            unspaced[token] = id_of.get(text[1:], token)
        ends_line[token] = text.endswith("\n")
    return unspaced, ends_line


def word_starts(tokenizer, vocab_size: int) -> torch.Tensor:
    """Over the vocabulary: whether a token begins a new word (a space, punctuation, a line break) rather than
    continuing the one before it ("ov" in "Zathfaex|ov", "70" in "20|70")."""
    starts = torch.ones(vocab_size, dtype=torch.bool)
    for token, text in enumerate(token_texts(tokenizer, vocab_size)):
        starts[token] = not (text[:1].isalnum() and "\ufffd" not in text)
    return starts
