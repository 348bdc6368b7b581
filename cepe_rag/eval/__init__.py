"""Open-domain QA evaluation: datasets, metrics, a cached and resumable runner, reports."""

_EXPORTS = {"QAExample": "data", "load_questions": "data", "exact_match": "metrics", "normalize_answer": "metrics",
            "substring_match": "metrics", "token_f1": "metrics", "answerable_subset": "runner",
            "run_eval": "runner", "summarise_folder": "runner"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # The runner (retrieval, FAISS) loads on first use: training imports the metrics on a machine without FAISS.
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"cepe_rag.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
