"""Open-domain QA evaluation: datasets, metrics, a cached and resumable runner, reports."""

from cepe_rag.eval.data import QAExample, load_questions
from cepe_rag.eval.metrics import exact_match, normalize_answer, substring_match, token_f1
from cepe_rag.eval.runner import answerable_subset, run_eval, summarise_folder

__all__ = ["QAExample", "answerable_subset", "exact_match", "load_questions", "normalize_answer", "run_eval",
           "substring_match", "summarise_folder", "token_f1"]
