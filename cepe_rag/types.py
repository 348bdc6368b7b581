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
    score: float = 0.0

    def as_prompt_text(self) -> str:
        return f"Document (Title: {self.title}): {self.text}" if self.title else f"Document: {self.text}"


@dataclass
class Answer:
    text: str
    passages: list[Passage]
    reader: str
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
