"""Calibrate and measure abstention: answer "not in the documents" when the best passage is not relevant enough.

    python benchmarks/abstention.py --out benchmarks/results/abstention

Unanswerable questions are the own-documents questions asked of the demo index, which lacks their files (the
facts removed); answerable ones are the same questions asked of indexes/owndocs. The threshold on the best
retrieved passage's cosine similarity is chosen on the tuning questions only (largest abstention rate on
unanswerable minus abstention rate on answerable; the lowest such threshold), then measured on the test
questions and on NQ. Accuracy after abstention re-scores recorded predictions (the readers' answers do not
change; an abstained question scores 0), so no decoder runs here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cepe_rag.eval.data import load_questions
from cepe_rag.eval.runner import read_predictions
from cepe_rag.pipelines.rag import Retriever, relevance
from cepe_rag.settings import DEFAULT_K


def best_relevance(questions, retriever: Retriever, k: int) -> np.ndarray:
    found = retriever.retrieve_batch([q.question for q in questions], k)
    return np.array([relevance(passages) for passages in found], dtype=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", default="runs/owndocs/questions.tune.jsonl")
    parser.add_argument("--test", default="runs/owndocs/questions.test.jsonl")
    parser.add_argument("--answerable-index", default="indexes/owndocs")
    parser.add_argument("--unanswerable-index", default="indexes/default")
    parser.add_argument("--owndocs-predictions", default="benchmarks/results/owndocs/test/predictions")
    parser.add_argument("--nq-questions", default="../shared/data/nq_open/NQ-open.dev.jsonl")
    parser.add_argument("--nq-predictions", default="benchmarks/results/nq500/predictions")
    parser.add_argument("--nq-index", default="indexes/default")
    parser.add_argument("--readers", default="concat_k5,concat_k20,closed-book_k0")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="passages retrieved (relevance is their best)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    answerable = Retriever(args.answerable_index)
    unanswerable = Retriever(args.unanswerable_index, answerable.embedder)
    tune, test = load_questions(args.tune), load_questions(args.test)
    tune_yes, tune_no = best_relevance(tune, answerable, args.k), best_relevance(tune, unanswerable, args.k)

    grid = np.round(np.arange(0.20, 0.90, 0.01), 2)
    gains = [float((tune_no < t).mean() - (tune_yes < t).mean()) for t in grid]
    threshold = float(grid[int(np.argmax(gains))])

    test_yes, test_no = best_relevance(test, answerable, args.k), best_relevance(test, unanswerable, args.k)
    result = {"k": args.k, "threshold": threshold, "tuning": {
        "n": len(tune), "abstained_unanswerable": 100 * float((tune_no < threshold).mean()),
        "abstained_answerable": 100 * float((tune_yes < threshold).mean())},
        "test": {"n": len(test), "abstained_unanswerable": 100 * float((test_no < threshold).mean()),
                 "abstained_answerable": 100 * float((test_yes < threshold).mean()),
                 "relevance_answerable_p5_p50": np.percentile(test_yes, [5, 50]).round(3).tolist(),
                 "relevance_unanswerable_p50_p95": np.percentile(test_no, [50, 95]).round(3).tolist()},
        "accuracy": []}

    nq_all = {q.id: q for q in load_questions(args.nq_questions)}
    for name, questions, folder, retriever, scores in (
            ("own documents (test)", test, Path(args.owndocs_predictions), answerable, test_yes),
            ("NQ-500", None, Path(args.nq_predictions), Retriever(args.nq_index, answerable.embedder), None)):
        for reader in args.readers.split(","):
            path = folder / f"{reader}.jsonl"
            if not path.exists():
                continue
            predictions = read_predictions(path)
            if questions is None:  # NQ: the questions the predictions answer, in their order
                questions = [nq_all[qid] for qid in predictions if qid in nq_all]
                scores = best_relevance(questions, retriever, args.k)
            kept = [q for q in questions if q.id in predictions]
            if len(kept) != len(questions):
                continue
            correct = np.array([predictions[q.id]["substring_em"] for q in questions], dtype=float)
            abstains = scores < threshold
            result["accuracy"].append({
                "benchmark": name, "reader": reader, "n": len(questions),
                "abstained": 100 * float(abstains.mean()),
                "substring_em": 100 * float(correct.mean()),
                "substring_em_after": 100 * float((correct * ~abstains).mean())})

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abstention.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"threshold (cosine of the best of {args.k} passages): {threshold:.2f}, chosen on {len(tune)} tuning "
             "questions", "",
             "| questions | n | abstained on unanswerable | abstained on answerable |", "|---|---|---|---|",
             f"| tuning | {len(tune)} | {result['tuning']['abstained_unanswerable']:.1f}% | "
             f"{result['tuning']['abstained_answerable']:.1f}% |",
             f"| test | {len(test)} | {result['test']['abstained_unanswerable']:.1f}% | "
             f"{result['test']['abstained_answerable']:.1f}% |", "",
             "| benchmark | reader | n | abstained | substring EM | after abstention |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['reader']} | {r['n']} | {r['abstained']:.1f}% | {r['substring_em']:.1f} | "
              f"{r['substring_em_after']:.1f} |" for r in result["accuracy"]]
    (args.out / "abstention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
