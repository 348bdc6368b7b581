"""The names a question mentions, and where they stand in a passage: an answer does not repeat them. Copying the
question's subject ("Who designed the Virkdeisund Bridge?" -> "The Virkdeisund") was the CEPE copy pointer's commonest
wrong answer; the cepe reader's question-name penalty and extractive decoding both keep answers off them. A question
typed in lower case ("the last time la dodgers won the world series") names things too: a passage word that is
capitalised and is one of the question's words ("Dodgers") counts as a name the question mentions."""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

from cepe_rag.indexes.passage_db import STOPWORDS

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


_ASKING = {"which", "what", "whose"}


def question_words(question: str) -> set[str]:
    """The question's words that are not function words, lower-cased ("who sings this crazy little thing called
    love" -> {"sings", "crazy", "little", "thing", "called", "love"}), less the word it asks for ("into which lake":
    the answer is "Lake Zotyvis")."""
    words = _WORD.findall(question)
    return {_name_word(word) for i, word in enumerate(words)
            if word.lower() not in STOPWORDS and not (i and words[i - 1].lower() in _ASKING)}


def asked_names(question: str, titles: Sequence[str], texts: Sequence[str]) -> set[str]:
    """question_names, or for a question typed without capitals, those of its question_words that these passages
    write as names: in a title, or capitalised where no sentence starts ("in which city is the kefaexane bridge" ->
    {"kefaexane", "bridge"})."""
    if question != question.lower():
        return question_names(question)
    written = {_name_word(word) for title in titles for word in _WORD.findall(title) if word[:1].isupper()}
    for text in texts:
        for word in _WORD.finditer(text):
            if word.group()[:1].isupper() and text[: word.start()].rstrip()[-1:] not in ("", ".", "!", "?", ":"):
                written.add(_name_word(word.group()))
    return question_words(question) & written


def missing_name_share(names: set[str], text: str) -> float:
    """The share of a question's `names` (question_names) that `text` does not contain as words (0 without names):
    of two near-namesakes ("Kefaexane Bridge", "Kefauxane Bridge") the passage about the other one lacks half."""
    if not names:
        return 0.0
    return len(names - {_name_word(word) for word in _WORD.findall(text)}) / len(names)


def named_tokens(question: str, text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token of `text` (its character `offsets`): whether it is part of a word of a name the question mentions
    (a word of question_names, or a capitalised word of the passage that is one of question_words), or of an article
    just before one."""
    names, asked = question_names(question), question_words(question)
    if not names and not asked:
        return [False] * len(offsets)
    words = list(_WORD.finditer(text))

    def is_name(word: str) -> bool:
        return _name_word(word) in names or (word[:1].isupper() and _name_word(word) in asked)

    named = [(word.start(), word.end()) for i, word in enumerate(words)
             if is_name(word.group()) or (word.group().lower() in _ARTICLES and i + 1 < len(words) and
                                          is_name(words[i + 1].group()))]
    ends = [end for _, end in named]
    flags = []
    for start, end in offsets:
        i = bisect.bisect_right(ends, start)  # the first named word ending after this token starts
        flags.append(i < len(named) and named[i][0] < end)
    return flags
