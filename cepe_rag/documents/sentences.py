"""Sentences of a passage, and a text with its title's words taken out: what sentence focus and the cepe reader's
sentence prior score against the question. Sentence boundaries come from pysbd."""

from __future__ import annotations

import re
from functools import lru_cache

import pysbd


@lru_cache(maxsize=1)
def _segmenter() -> pysbd.Segmenter:
    return pysbd.Segmenter(language="en", clean=False)


def sentences(text: str) -> list[str]:
    """The text's sentences, each with its trailing whitespace stripped; joined with spaces they are the text's
    words in order."""
    return [s.strip() for s in _segmenter().segment(text) if s.strip()]


def without_title(text: str, title: str) -> str:
    """`text` with the words of `title` taken out, so that what is left says what a sentence (or question) is about,
    not whom: "Who designed the Quorvath Bridge?" -> "Who designed the ?"."""
    words = [w for w in re.findall(r"\w+", title) if len(w) > 2]
    if words:
        text = re.sub(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", "", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip()
