"""Retrieval: a question -> the index's passages for it, dense (embedder + FAISS or Qdrant), lexical (BM25) or both
fused by reciprocal rank, optionally filtered by source and title."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cepe_rag.indexes import PassageStore, open_store
from cepe_rag.models import embed_texts, load_query_embedder
from cepe_rag.settings import (
    DEFAULT_RETRIEVAL,
    FUSION_DEPTH,
    LEXICAL_WEIGHT,
    RETRIEVAL_MODES,
    RRF_CONSTANT,
    check_choice,
)
from cepe_rag.types import CepeRagError, Passage


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

    def __init__(self, index: str | Path | PassageStore, embedder=None, *,
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
