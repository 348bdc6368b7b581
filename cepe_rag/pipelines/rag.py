"""Question path: question -> embedding -> FAISS top-k -> passages -> reader -> Answer with sources."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cepe_rag.indexes import IndexStore
from cepe_rag.models import embed_texts, load_query_embedder
from cepe_rag.types import Answer, CepeRagError, Passage, validate_question

if TYPE_CHECKING:
    from cepe_rag.readers import Reader

class Retriever:
    """Dense retrieval over an index folder with the embedder recorded in its manifest."""

    def __init__(self, index: str | Path | IndexStore, embedder=None):
        self.store = index if isinstance(index, IndexStore) else IndexStore.open(index)
        self.embedder = embedder or load_query_embedder(self.store.manifest.embedder)

    def retrieve(self, question: str, k: int) -> list[Passage]:
        return self.retrieve_batch([question], k)[0]

    def retrieve_batch(self, questions: list[str], k: int) -> list[list[Passage]]:
        if k < 1:
            raise CepeRagError("k must be at least 1")
        return self.store.search(embed_texts(self.embedder, questions), k)


class RagPipeline:
    def __init__(self, retriever: Retriever, reader: Reader):
        self.retriever = retriever
        self.reader = reader

    def ask(self, question: str, k: int = 20, *, on_token: Callable[[str], None] | None = None,
            **generation) -> Answer:
        question = validate_question(question)
        started = time.perf_counter()
        passages = self.retriever.retrieve(question, k) if k > 0 and self.reader.reads_passages else []
        retrieval_s = time.perf_counter() - started
        answer = self.reader.answer(question, passages, on_token=on_token, **generation)
        answer.timings["retrieval_s"] = retrieval_s
        answer.passages = answer.passages or passages
        answer.usage["passages_retrieved"] = len(passages)
        return answer
