"""End-to-end pipelines: indexing a corpus, answering a question."""

from cepe_rag.pipelines.indexing import IndexingSummary, build_index
from cepe_rag.pipelines.rag import RagPipeline, Retriever, validate_question

__all__ = ["IndexingSummary", "RagPipeline", "Retriever", "build_index", "validate_question"]
