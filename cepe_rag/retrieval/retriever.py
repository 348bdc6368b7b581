"""Question path: question -> embedding -> FAISS top-k -> passages -> reader -> Answer with sources."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cepe_rag.indexes import IndexStore, QdrantStore, open_store
from cepe_rag.models import embed_texts, load_query_embedder
from cepe_rag.settings import (
    ABSTAIN_BELOW,
    ABSTAIN_FLOOR,
    DEFAULT_RETRIEVAL,
    FUSION_DEPTH,
    LEXICAL_WEIGHT,
    NOT_IN_DOCUMENTS,
    RETRIEVAL_MODES,
    RRF_CONSTANT,
    check_choice,
)
from cepe_rag.types import Answer, CepeRagError, Passage, validate_question

if TYPE_CHECKING:
    from cepe_rag.readers import Reader

@dataclass(frozen=True)
class PassageFilter:
    """Metadata filters: globs on a passage's source path and title (SQLite GLOB: case-sensitive, `*`, `?`)."""

    source: str | None = None
    title: str | None = None

    def __bool__(self) -> bool:
        return bool(self.source or self.title)


class Retriever:
    """Passages for a question from an index folder: dense (the embedder recorded in its manifest), lexical
    (BM25), or both fused by reciprocal rank; optionally only passages whose metadata match `filters`. The
    passages are in the folder (FAISS + SQLite) or in Qdrant, as its manifest says."""

    def __init__(self, index: str | Path | IndexStore | QdrantStore, embedder=None, *,
                 mode: str = DEFAULT_RETRIEVAL, filters: PassageFilter | None = None,
                 lexical_weight: float = LEXICAL_WEIGHT):
        check_choice(mode, RETRIEVAL_MODES, "retrieval mode")
        self.lexical_weight = lexical_weight
        self.store = open_store(index) if isinstance(index, (str, Path)) else index
        if mode == "lexical":
            self.store.check_lexical()
        self.filters = filters or PassageFilter()
        # Ids the filters let through, found once (like the FAISS index, fixed for this retriever's life).
        self.allowed = self.store.matching_ids(self.filters.source, self.filters.title) if self.filters else None
        # An index from before lexical search (or in Qdrant, which has none) answers hybrid requests densely.
        self.lexical_missing = mode == "hybrid" and not self.store.has_lexical_index
        self.mode = "dense" if self.lexical_missing else mode
        self.embedder = None if self.mode == "lexical" else (
            embedder or load_query_embedder(self.store.manifest.embedder))

    def retrieve(self, question: str, k: int) -> list[Passage]:
        return self.retrieve_batch([question], k)[0]

    def retrieve_batch(self, questions: list[str], k: int) -> list[list[Passage]]:
        if k < 1:
            raise CepeRagError("k must be at least 1")
        allowed = self.allowed
        if self.mode == "lexical":
            return self.store.lexical_search(questions, k, allowed)
        depth = k if self.mode == "dense" else max(k, FUSION_DEPTH)
        queries = embed_texts(self.embedder, questions)
        dense = self.store.search(queries, depth, allowed)
        if self.mode == "dense":
            return [[replace(p, dense_score=p.score) for p in ranking] for ranking in dense]
        lexical = self.store.lexical_search(questions, depth, allowed)
        results = [fuse(d, lex, self.lexical_weight)[:k] for d, lex in zip(dense, lexical)]
        for query, passages in zip(queries, results):  # passages only BM25 found get their cosine too
            missing = [p for p in passages if p.dense_score is None]
            for passage, vector in zip(missing, self.store.embeddings([p.id for p in missing])):
                passage.dense_score = float(vector @ query)
        return results

    def unknown_words(self, question: str) -> list[str]:
        """The question's words that no indexed passage contains ([] without a lexical index)."""
        return self.store.unknown_words(question) if self.store.has_lexical_index else []

    def abstention_reason(self, question: str, passages: list[Passage], abstention: Abstention | None) -> str | None:
        """Why these passages do not answer the question, or None (read them)."""
        if abstention is None or relevance(passages) is None:
            return None
        return abstention.reason(passages, self.unknown_words(question))


def fuse(dense: list[Passage], lexical: list[Passage], lexical_weight: float = 1.0) -> list[Passage]:
    """Weighted reciprocal rank fusion: score = 1 / (RRF_CONSTANT + dense rank) + lexical_weight / (RRF_CONSTANT +
    lexical rank); each passage keeps its dense (cosine) and lexical (BM25) scores beside the fused one."""
    fused: dict[int, Passage] = {}
    for ranking, field, weight in ((dense, "dense_score", 1.0), (lexical, "lexical_score", lexical_weight)):
        for rank, passage in enumerate(ranking, start=1):
            entry = fused.setdefault(passage.id, replace(passage, score=0.0))
            entry.score += weight / (RRF_CONSTANT + rank)
            setattr(entry, field, passage.score)
    return sorted(fused.values(), key=lambda p: p.score, reverse=True)


def relevance(passages: list[Passage]) -> float | None:
    """How relevant the best retrieved passage is: its cosine similarity to the question (None: not known)."""
    scores = [p.dense_score for p in passages if p.dense_score is not None]
    return max(scores) if scores else None


@dataclass(frozen=True)
class Abstention:
    """When to answer NOT_IN_DOCUMENTS instead of reading: the best passage's cosine similarity is below `floor`,
    or below `below` while the question names a word that no indexed passage contains (README, "Abstention")."""

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


class RagPipeline:
    """Retrieve, then read; or, when `abstention` says no passage answers the question, say NOT_IN_DOCUMENTS
    without running the reader (None: always read)."""

    def __init__(self, retriever: Retriever, reader: Reader, *, abstention: Abstention | None = DEFAULT_ABSTENTION):
        self.retriever = retriever
        self.reader = reader
        self.abstention = abstention

    def ask(self, question: str, k: int = 20, *, on_token: Callable[[str], None] | None = None,
            **generation) -> Answer:
        question = validate_question(question)
        started = time.perf_counter()
        passages = self.retriever.retrieve(question, k) if k > 0 and self.reader.reads_passages else []
        retrieval_s = time.perf_counter() - started
        reason = self.retriever.abstention_reason(question, passages, self.abstention)
        if reason:
            self.reader.prepare(question, passages)  # a question too long for the decoder is an error all the same
            if on_token:
                on_token(NOT_IN_DOCUMENTS)
            return Answer(NOT_IN_DOCUMENTS, passages, self.reader.name, abstained=reason,
                          timings={"retrieval_s": retrieval_s, "first_token_s": 0.0, "total_s": 0.0},
                          usage={"prompt_tokens": 0, "decode_steps": 0, "passages_read": 0,
                                 "passages_retrieved": len(passages)})
        answer = self.reader.answer(question, passages, on_token=on_token, **generation)
        answer.timings["retrieval_s"] = retrieval_s
        answer.passages = answer.passages or passages
        answer.usage["passages_retrieved"] = len(passages)
        return answer
