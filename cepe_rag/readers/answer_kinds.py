"""What kind of answer a question asks for, read from its question words: a count or a year begins with a number, a
person or a place does not. Extractive decoding uses it to keep an answer's first word to its kind: a small reader
asked "Where was Ilse Dinbreskel born?" answers with the year in the same sentence ("1790"), asked "how many episodes
are in season 1" with a year ("1997"), asked who designed a bridge with the verb after the name ("opened in 1871"). A
proper name also ends where the passage stops naming, where the same reader ran on ("Ottilie Varga and carried its
first train in 1911"), and goes on while it still names: an organisation is not cut after its first word
("Mioskioxora" for "Mioskioxora Academy"). The rules are few and conservative: a question they do not recognise asks
for anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum

_WORD = re.compile(r"\$?[\w'’\-.,]*\w|\$")


class AnswerKind(Enum):
    ANY = "any"
    NUMBER = "number"  # a count, an amount, an age: "12", "twelve", "$7.25"
    DATE = "date"  # a year or a date: "1988", "June 1, 2017", "the 1950s"
    NAME = "name"  # a field, a language, a thing: neither a number nor a pronoun
    PROPER = "proper"  # a person, a place, an organisation: a capitalised word that is not a pronoun or an article


_NUMBER_WORDS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
                 "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million",
                 "billion", "dozen", "dozens", "hundreds", "thousands", "millions", "billions", "several", "about",
                 "around", "approximately", "nearly", "almost", "roughly", "over", "more"}
_MONTHS = {"january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
_DATE_WORDS = _MONTHS | {"early", "late", "mid", "circa", "spring", "summer", "autumn", "fall", "winter"}
_PROPER_NOUNS = {"city", "town", "village", "country", "state", "province", "county", "region", "continent", "island",
                 "lake", "river", "sea", "ocean", "mountain", "organisation", "organization", "company", "team", "club",
                 "band", "university", "school", "person", "player", "artist", "author", "actor", "actress", "singer",
                 "character", "president", "king", "queen"}
_NAME_NOUNS = {"group", "party", "field", "language", "religion", "name"}
_COUNT_WORDS = {"many", "much", "old", "long", "far", "tall", "high", "big", "large", "deep", "wide", "fast", "heavy"}
_PROPER_WORDS = {"who", "whom", "whose", "where"}
PRONOUNS = {"it", "its", "he", "his", "him", "she", "her", "they", "their", "them", "this", "these", "those", "there",
            "we", "you", "i"}
_ARTICLES = {"the", "a", "an"}  # the metric drops them, so "Beatles" answers "The Beatles"
_NAME_PARTICLES = {"of", "de", "du", "des", "del", "della", "di", "da", "dos", "das", "van", "von", "der", "den", "la",
                   "le", "y", "bin", "bint", "ibn", "al", "el"}  # lower-case words inside names: "Bank of England"
_CLAUSE_MARKS = tuple(",;:()[]\"“”!?")


def answer_kind(question: str) -> AnswerKind:
    """The kind of answer `question` asks for, from its first question word ("when", "how many", "who", "which
    year", "in which city"); ANY where the words do not say (a "what" question may ask for a name or a number)."""
    words = re.findall(r"[a-z]+", question.lower())
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word == "when":
            return AnswerKind.DATE
        if word in ("what", "which") and following in ("year", "date", "century", "decade"):
            return AnswerKind.DATE
        if word == "how" and following in _COUNT_WORDS:
            return AnswerKind.NUMBER
        if word in ("what", "which") and following in ("age", "number", "percentage", "percent"):
            return AnswerKind.NUMBER
        if word in _PROPER_WORDS or (word in ("what", "which") and following in _PROPER_NOUNS):
            return AnswerKind.PROPER
        if word in ("what", "which") and following in _NAME_NOUNS:
            return AnswerKind.NAME
        if word in ("what", "which", "how", "why"):
            return AnswerKind.ANY  # the first question word decides; "what ... when" asks for a "what"
    return AnswerKind.ANY


def _is_number(word: str) -> bool:
    return word[:1].isdigit() or word[:1] == "$"


def may_begin(kind: AnswerKind, word: str) -> bool:
    """Whether an answer of this kind may begin with this word."""
    lowered = word.lower().rstrip(".,")
    if kind is AnswerKind.NUMBER:
        return _is_number(word) or lowered in _NUMBER_WORDS
    if kind is AnswerKind.DATE:
        return _is_number(word) or lowered in _DATE_WORDS
    if kind is AnswerKind.NAME:
        return not _is_number(word) and lowered not in PRONOUNS
    if kind is AnswerKind.PROPER:
        return word[:1].isupper() and lowered not in PRONOUNS | _ARTICLES
    return True


def may_continue(kind: AnswerKind, word: str) -> bool:
    """Whether an answer of this kind that has begun may go on into this word: a proper name goes on only through
    capitalised words, numbers and name particles, so "Ottilie Varga" ends before "and carried its first train"."""
    if kind is AnswerKind.PROPER:
        return may_begin(kind, word) or word[:1].isdigit() or word in _NAME_PARTICLES
    return True


def _words_begun(text: str, offsets: Sequence[tuple[int, int]]) -> tuple[list[re.Match], list[int | None]]:
    """The words of `text`, and per token (its character `offsets`) the index of the word it begins, or None where it
    begins none ("70" in "2070", a comma)."""
    words = list(_WORD.finditer(text))
    begun, i = [], 0
    for start, end in offsets:
        while i < len(words) and words[i].end() <= start:
            i += 1
        begun.append(i if i < len(words) and start <= words[i].start() < end else None)
    return words, begun


def wrong_kind_tokens(kind: AnswerKind, text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token of `text` (its character `offsets`): whether an answer of this kind may not begin there: the token
    does not begin a word ("70" in "2070", a comma), or begins one that may not begin an answer of this kind."""
    if kind is AnswerKind.ANY:
        return [False] * len(offsets)
    words, begun = _words_begun(text, offsets)
    return [j is None or not may_begin(kind, words[j].group()) for j in begun]


def answer_ending_tokens(kind: AnswerKind, text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token of `text`: whether an answer of this kind that has begun may not go on into it, which ends the answer
    before it: a word it may not continue with (`may_continue`), or, in a proper name, a clause mark (", and its
    weekly market")."""
    if kind is not AnswerKind.PROPER:
        return [False] * len(offsets)
    words, begun = _words_begun(text, offsets)
    return [text[start:end].strip().startswith(_CLAUSE_MARKS)
            or (j is not None and not may_continue(kind, words[j].group()))
            for (start, end), j in zip(offsets, begun)]


def name_going_on_tokens(kind: AnswerKind, text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token of `text`: whether it begins a capitalised word that follows the word before it with only a space, so
    that a proper name may not end before it: the reader that answered "Mioskioxora" for "Mioskioxora Academy" stopped
    inside a name. A line break or a clause mark in between, or a pronoun or an article, lets the name end."""
    if kind is not AnswerKind.PROPER:
        return [False] * len(offsets)
    words, begun = _words_begun(text, offsets)
    return [j is not None and j > 0 and _only_spaces(text[words[j - 1].end():words[j].start()])
            and may_begin(kind, words[j].group()) for j in begun]


def _only_spaces(gap: str) -> bool:
    return gap != "" and gap.strip(" ") == ""
