"""The few types every stage shares."""

from __future__ import annotations

from dataclasses import dataclass, field


class CepeRagError(Exception):
    """A problem the user can fix; the CLI prints it as one line, without a traceback."""


@dataclass
class Passage:
    """A retrieved chunk of a document: what retrieval returns and readers consume."""

    id: int
    text: str
    title: str = ""
    source: str = ""
    score: float = 0.0  # the retriever's ranking score: cosine (dense), BM25 (lexical) or fused (hybrid)
    dense_score: float | None = None  # hybrid retrieval: the passage's score in each list it was found in
    lexical_score: float | None = None

    def as_prompt_text(self) -> str:
        return f"Document (Title: {self.title}): {self.text}" if self.title else f"Document: {self.text}"


@dataclass
class Answer:
    text: str
    passages: list[Passage]
    reader: str
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    abstained: str | None = None  # why no passage answers it (the text then says so); None: the reader answered
    read_rule: str = ""  # which retrieved passages the reader read, and why (the relevance cutoff)


MAX_QUESTION_CHARS = 20_000


def validate_question(question: str) -> str:
    """The question, stripped; an empty or oversized one is a one-line error before any model loads."""
    question = question.strip()
    if not question:
        raise CepeRagError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise CepeRagError(f"the question is {len(question):,} characters; at most {MAX_QUESTION_CHARS:,} are accepted")
    return question
