"""Open-domain QA metrics as in the literature (SQuAD normalisation)."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def substring_match(prediction: str, golds: list[str]) -> float:
    """A normalised gold answer occurs in the normalised prediction (plain substring, as in baselines.md)."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(g) and normalize_answer(g) in pred for g in golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common:
            precision, recall = common / len(pred_tokens), common / len(gold_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def answer_in_passages(texts: list[str], golds: list[str]) -> bool:
    """Retrieval recall's hit test: a normalised gold answer occurs in a normalised passage."""
    normalized = [normalize_answer(t) for t in texts]
    return any(normalize_answer(g) and normalize_answer(g) in t for g in golds for t in normalized)


def postprocess(prediction: str) -> str:
    """Answers are cut at the first newline (as in the paper); surrounding space and quotes dropped."""
    return prediction.split("\n", 1)[0].strip().strip('"').strip()


def paired_bootstrap(first: list[float], second: list[float], *, samples: int = 10_000, seed: int = 0,
                     ) -> tuple[float, float, float]:
    """Mean of first - second over the same questions, with a 95% paired bootstrap interval (in points).

    Resampling questions, not readers, is what makes two readers' rows on one question set comparable:
    their scores on a question are correlated (both know it, or neither), which an unpaired interval
    ignores, so it would call too many differences noise.
    """
    import numpy as np

    if len(first) != len(second) or not first:
        raise ValueError("paired scores need the same, non-zero number of questions")
    differences = 100 * (np.asarray(first, dtype=float) - np.asarray(second, dtype=float))
    draws = np.random.default_rng(seed).integers(0, len(differences), size=(samples, len(differences)))
    means = differences[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(differences.mean()), float(low), float(high)
