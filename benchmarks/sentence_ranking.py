"""Which sentence scoring finds the sentence that holds the answer (sentence focus, cepe_rag/retrieval/focus.py).

    python benchmarks/sentence_ranking.py --out benchmarks/results/focus/ranking_tune.json

On the tuning questions (relevance_cutoff.py's sets), for each question whose top read passage has several sentences
and holds a gold answer: how often the sentence each scoring ranks first holds it. Scorings: the first sentence (no
scoring), plain cosine of question and sentence, each sentence prefixed with the passage title, and the title's words
taken out of the question and of each sentence (what focus.py does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from relevance_cutoff import add_question_set_options, question_sets  # noqa: E402

from cepe_rag.eval.metrics import normalize_answer  # noqa: E402
from cepe_rag.models import embed_texts  # noqa: E402
from cepe_rag.readers.base import read_selection  # noqa: E402
from cepe_rag.retrieval.focus import sentences, without_title  # noqa: E402
from cepe_rag.settings import DEFAULT_K, DEFAULT_READ_MARGIN  # noqa: E402

SCORINGS = ("first_sentence", "cosine", "title_prefixed", "title_words_out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_question_set_options(parser, nq_limit=150)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {}
    for name, (questions, retriever) in question_sets(args.split, args).items():
        found = retriever.retrieve_batch([q.question for q in questions], DEFAULT_K)
        hits, n = dict.fromkeys(SCORINGS, 0), 0
        for question, passages in zip(questions, found):
            passage = read_selection(passages, DEFAULT_READ_MARGIN)[0][0]
            parts = sentences(passage.text)
            golds = [normalize_answer(a) for a in question.answers if normalize_answer(a)]
            holds = [any(g in normalize_answer(s) for g in golds) for s in parts]
            if len(parts) < 2 or not any(holds):
                continue
            n += 1
            hits["first_sentence"] += holds[0]
            variants = {"cosine": (question.question, parts),
                        "title_prefixed": (question.question, [f"{passage.title}: {s}" for s in parts]),
                        "title_words_out": (without_title(question.question, passage.title),
                                            [without_title(s, passage.title) for s in parts])}
            for scoring, (query, texts) in variants.items():
                vectors = np.asarray(embed_texts(retriever.embedder, [query, *texts]))
                hits[scoring] += holds[int(np.argmax(vectors[1:] @ vectors[0]))]
        results[name] = {"questions": n, **{k: round(100 * v / max(n, 1), 1) for k, v in hits.items()}}
        print(name, json.dumps(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
