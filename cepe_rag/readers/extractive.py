"""Extractive decoding: every answer is a span of the passages read.

A short answer to a question about documents is, nearly always, a few words copied from one of them (the open-domain QA
benchmarks define their answers so). A small reader drifts off them: it repeats a name ("Darthes. Darthes"), stutters
inside one ("Briovryvryv") or starts with a word no passage holds. With `--extractive`, each decoding step may only
choose a token that continues, token for token, a span of some passage the answer has matched so far, or end the answer.
Its first token may be any passage token (in its line-start form too) except one of a name the question mentions
(question_names.py): an answer does not repeat its question's subject; nor may it begin with a word of the wrong kind
(answer_kinds.py: a capitalised name for "who" or "where", a number or a date for "how many" or "when"), and a name ends
where the passage's words stop being one ("Ottilie Varga", not "Ottilie Varga and carried its first train") and not
before ("Mioskioxora Academy", not "Mioskioxora"). It may end only where a word of the passage ends: a small reader that
stops inside a word ("Lucia Zathfaex" for "Lucia Zathfaexov", "20" for "2070") has found the right span and only lost
its nerve. The reader's own distribution still chooses among what is left; the constraint only removes what no passage
supports.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache

import numpy as np
import torch

from cepe_rag.readers.answer_kinds import (
    answer_ending_tokens,
    answer_kind,
    name_going_on_tokens,
    wrong_kind_tokens,
)
from cepe_rag.readers.question_names import named_tokens
from cepe_rag.token_forms import line_start_forms, word_starts

SEPARATOR = -1  # between passages in the flat token list: no span crosses it


class SpanConstraint:
    """One answer's constraint, advanced token by token as the answer is decoded. `passages`: each passage's token ids;
    `unspaced`: each vocabulary id's line-start form (`token_forms.line_start_forms`); `word_starts`: whether each
    vocabulary id begins a word (None: every token does); `no_start`: per passage, per token, whether an answer may
    not begin there; `no_continue`: whether an answer that has begun may not go on into it (it ends before);
    `goes_on`: whether an answer may not end just before it (a name that goes on)."""

    def __init__(self, passages: Sequence[Sequence[int]], unspaced: np.ndarray, word_starts: np.ndarray | None = None,
                 no_start: Iterable[Sequence[bool]] | None = None,
                 no_continue: Iterable[Sequence[bool]] | None = None,
                 goes_on: Iterable[Sequence[bool]] | None = None):
        flat: list[int] = []
        for ids in passages:
            flat += [*ids, SEPARATOR]
        self.tokens = np.asarray(flat or [SEPARATOR], dtype=np.int64)
        starts = self.tokens >= 0
        if no_start is not None:
            starts &= ~_flat_flags(no_start)
        self.continues = self.tokens >= 0
        if no_continue is not None:
            self.continues &= ~_flat_flags(no_continue)
        # The first answer token follows a line break, where a passage's " Lucia" is written "Lucia".
        self.start_tokens = np.where(starts, self.tokens, SEPARATOR)
        self.start_forms = np.where(starts, unspaced[np.where(starts, self.tokens, 0)], SEPARATOR)
        self.matched: np.ndarray | None = None  # positions of the answer's last token in the passages
        # An answer may end after position p when what follows p begins a word (or ends the passage).
        following = np.append(self.tokens[1:], SEPARATOR)
        self.ends_word = np.ones(len(self.tokens), dtype=bool) if word_starts is None else \
            (following < 0) | word_starts[np.where(following < 0, 0, following)]
        if goes_on is not None:
            self.ends_word &= ~(np.append(_flat_flags(goes_on)[1:], True) & (following >= 0))

    def allowed(self) -> np.ndarray:
        """The token ids the answer may continue with (besides ending)."""
        if self.matched is None:
            ids = np.concatenate([self.start_tokens, self.start_forms])
        else:
            ids = self.tokens[self._following()]
        return np.unique(ids[ids >= 0])

    def _following(self) -> np.ndarray:
        following = self.matched + 1  # the flat list ends with a separator: always in range
        return following[self.continues[following]]

    def may_end(self) -> bool:
        """Whether the answer may end here: at a word's end in some passage it matches (an empty answer may end)."""
        return self.matched is None or bool(self.ends_word[self.matched].any())

    def advance(self, token: int) -> None:
        if self.matched is None:
            self.matched = np.flatnonzero((self.start_tokens == token) | (self.start_forms == token))
        else:
            following = self._following()
            self.matched = following[self.tokens[following] == token]


def _flat_flags(per_passage: Iterable[Sequence[bool]]) -> np.ndarray:
    """Per-passage token flags laid out as SpanConstraint.tokens is: each passage, then its separator (flagged)."""
    return np.asarray([flag for flags in per_passage for flag in [*flags, True]] or [True], dtype=bool)


def constrain_logits(logits: torch.Tensor, constraints: Sequence[SpanConstraint | None], end_ids: Collection[int]
                     ) -> torch.Tensor:
    """`logits` (rows, vocab) with every token a row's constraint forbids set to -inf; `end_ids` (end of sequence)
    are allowed where its constraint may end, and a row without a constraint is untouched."""
    if all(c is None for c in constraints):
        return logits
    constrained = logits.clone()
    vocab = logits.shape[-1]
    for row, constraint in enumerate(constraints):
        if constraint is None:
            continue
        keep = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        allowed = constraint.allowed()
        keep[torch.from_numpy(allowed[allowed < vocab]).to(logits.device)] = True
        if constraint.may_end() or not len(allowed):
            keep[[i for i in end_ids if i < vocab]] = True
        constrained[row] = logits[row].masked_fill(~keep, float("-inf"))
    return constrained


@lru_cache(maxsize=4)
def _token_tables(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    return line_start_forms(tokenizer, len(tokenizer))[0].numpy(), word_starts(tokenizer, len(tokenizer)).numpy()


def span_constraint(question: str, texts: Sequence[str], tokenizer) -> SpanConstraint:
    """The constraint for an answer to `question` read from these passage texts."""
    if not texts:
        return SpanConstraint([], *_token_tables(tokenizer))
    if not getattr(tokenizer, "is_fast", False):  # no character offsets: the question's names cannot be found
        return SpanConstraint(tokenizer(list(texts), add_special_tokens=False)["input_ids"], *_token_tables(tokenizer))
    tokens = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    named = [named_tokens(question, text, offsets) for text, offsets in zip(texts, tokens["offset_mapping"])]
    kind = answer_kind(question)
    wrong = [wrong_kind_tokens(kind, text, offsets) for text, offsets in zip(texts, tokens["offset_mapping"])]
    ending = going_on = None
    if not all(all(flags) for flags in wrong):  # no word of the asked kind anywhere: any kind rather than none
        named = [[a or b for a, b in zip(names, kinds)] for names, kinds in zip(named, wrong)]
        ending = [answer_ending_tokens(kind, text, offsets) for text, offsets in zip(texts, tokens["offset_mapping"])]
        going_on = [name_going_on_tokens(kind, text, offsets) for text, offsets in zip(texts, tokens["offset_mapping"])]
    return SpanConstraint(tokens["input_ids"], *_token_tables(tokenizer), no_start=named, no_continue=ending,
                          goes_on=going_on)
