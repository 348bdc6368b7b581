"""When no retrieved passage answers the question: say so instead of reading (docs/retrieval.md, "Abstention")."""

from __future__ import annotations

from dataclasses import dataclass

from cepe_rag.retrieval.retriever import relevance
from cepe_rag.settings import ABSTAIN_BELOW, ABSTAIN_FLOOR
from cepe_rag.types import Passage


@dataclass(frozen=True)
class Abstention:
    """When to answer NOT_IN_DOCUMENTS instead of reading: the best passage's cosine similarity is below `floor`,
    or below `below` while the question names a word that no indexed passage contains."""

    below: float = ABSTAIN_BELOW
    floor: float = ABSTAIN_FLOOR

    def reason(self, passages: list[Passage], unknown_words: list[str]) -> str | None:
        best = relevance(passages)
        if best is None:
            return None
        if best < self.floor:
            return f"the best passage's similarity to the question is {best:.2f}, below {self.floor}"
        if unknown_words and best < self.below:
            named = ", ".join(repr(w) for w in unknown_words[:3])
            return f"no document contains {named} and the best passage's similarity is {best:.2f}, below {self.below}"
        return None


DEFAULT_ABSTENTION = Abstention()
