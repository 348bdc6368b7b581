"""The names a question mentions, and where they stand in a passage: an answer does not repeat them. Copying the
question's subject ("Who designed the Virkdeisund Bridge?" -> "The Virkdeisund") was the CEPE copy pointer's commonest
wrong answer; the cepe reader's question-name penalty and extractive decoding both keep answers off them."""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

_WORD = re.compile(r"[\w'’\-]+")
_ARTICLES = {"the", "a", "an"}
_POSSESSIVE = re.compile(r"['’]s$")


def _name_word(word: str) -> str:
    """Lower-cased, without a possessive ("Bridge's" names the bridge a passage calls "Bridge")."""
    return _POSSESSIVE.sub("", word.lower())


def question_names(question: str) -> set[str]:
    """The capitalised words of a question past its first, lower-cased: the names it mentions ("Who designed the
    Virkdeisund Bridge?" -> {"virkdeisund", "bridge"})."""
    return {_name_word(word) for word in _WORD.findall(question)[1:] if word[:1].isupper() and
            word.lower() not in _ARTICLES}


def missing_name_share(names: set[str], text: str) -> float:
    """The share of a question's `names` (question_names) that `text` does not contain as words (0 without names):
    of two near-namesakes ("Kefaexane Bridge", "Kefauxane Bridge") the passage about the other one lacks half."""
    if not names:
        return 0.0
    return len(names - {_name_word(word) for word in _WORD.findall(text)}) / len(names)


def named_tokens(question: str, text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token of `text` (its character `offsets`): whether it is part of a word of a name the question mentions,
    or of an article just before one."""
    names = question_names(question)
    if not names:
        return [False] * len(offsets)
    words = list(_WORD.finditer(text))
    named = [(word.start(), word.end()) for i, word in enumerate(words)
             if _name_word(word.group()) in names or (word.group().lower() in _ARTICLES and i + 1 < len(words) and
                                                     _name_word(words[i + 1].group()) in names)]
    ends = [end for _, end in named]
    flags = []
    for start, end in offsets:
        i = bisect.bisect_right(ends, start)  # the first named word ending after this token starts
        flags.append(i < len(named) and named[i][0] < end)
    return flags
