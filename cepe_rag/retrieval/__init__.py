"""Retrieval: passages for a question from an index (dense, BM25 or hybrid; filters), and when to abstain."""

from cepe_rag.retrieval.abstention import DEFAULT_ABSTENTION, Abstention
from cepe_rag.retrieval.retriever import PassageFilter, Retriever, fuse, relevance

__all__ = ["DEFAULT_ABSTENTION", "Abstention", "PassageFilter", "Retriever", "fuse", "relevance"]
