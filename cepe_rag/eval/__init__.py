"""Open-domain QA evaluation: datasets, metrics, a cached and resumable runner, reports."""

from cepe_rag.lazy import lazy_exports

# The runner (retrieval, FAISS) loads on first use: training imports the metrics on a machine without FAISS.
_EXPORTS = {"QAExample": "data", "load_questions": "data", "exact_match": "metrics", "normalize_answer": "metrics",
            "substring_match": "metrics", "token_f1": "metrics", "answerable_subset": "runner",
            "run_eval": "runner", "summarise_folder": "runner"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
