"""Calibrate and measure abstention: answer "not in the documents" when no retrieved passage is relevant enough.

    python benchmarks/abstention.py --out benchmarks/results/abstention

The rule (cepe_rag.retrieval.Abstention): abstain when the best passage's cosine similarity is below `floor`,
or below `below` while the question names a word no indexed passage contains.
- `floor` is chosen on NQ-open dev answer-in-corpus questions 501+ (outside the NQ-500 benchmark): the largest
  value at which at most 5% of the questions whose answer was retrieved would abstain.
- `below` is chosen on the own-documents tuning questions: unanswerable = asked of the demo index, which lacks
  their files (the facts removed); answerable = asked of indexes/owndocs. The value with the largest abstention
  rate on unanswerable minus abstention rate on answerable (the lowest such value).
Both are then measured on the own-documents test questions and on the NQ-500 benchmark. Accuracy after abstention
re-scores recorded predictions (an abstained question scores 0; the readers' other answers do not change), so no
decoder runs here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cepe_rag.eval.data import load_questions
from cepe_rag.eval.metrics import answer_in_passages
from cepe_rag.eval.runner import answerable_subset, read_predictions
from cepe_rag.retrieval import Retriever, relevance
from cepe_rag.settings import DEFAULT_K

GRID = np.round(np.arange(0.0, 0.90, 0.01), 2)


def signals(questions, retriever: Retriever, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per question: the best passage's cosine, whether it names a word no passage contains, answer retrieved."""
    found = retriever.retrieve_batch([q.question for q in questions], k)
    best = np.array([relevance(passages) for passages in found], dtype=float)
    unknown = np.array([bool(retriever.unknown_words(q.question)) for q in questions])
    retrieved = np.array([answer_in_passages([f"{p.title} {p.text}" for p in passages], q.answers)
                          for q, passages in zip(questions, found)])
    return best, unknown, retrieved


def abstains(best: np.ndarray, unknown: np.ndarray, below: float, floor: float) -> np.ndarray:
    return (best < floor) | (unknown & (best < below))


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
    nq_retriever = Retriever(args.nq_index, answerable.embedder)
    nq_all = load_questions(args.nq_questions)
    nq_answerable = answerable_subset(nq_all, nq_retriever)
    nq_best, nq_unknown, nq_retrieved = signals(nq_answerable[500:], nq_retriever, args.k)
    floor = float(max(t for t in GRID if (nq_best[nq_retrieved] < t).mean() <= 0.05))

    tune, test = load_questions(args.tune), load_questions(args.test)
    yes, no = signals(tune, answerable, args.k), signals(tune, unanswerable, args.k)
    gains = [float(abstains(no[0], no[1], t, floor).mean() - abstains(yes[0], yes[1], t, floor).mean())
             for t in GRID]
    below = float(GRID[int(np.argmax(gains))])

    def rates(answerable_signals, unanswerable_signals, n):
        return {"n": n, "abstained_unanswerable": 100 * float(abstains(*unanswerable_signals[:2], below, floor).mean()),
                "abstained_answerable": 100 * float(abstains(*answerable_signals[:2], below, floor).mean())}

    test_yes, test_no = signals(test, answerable, args.k), signals(test, unanswerable, args.k)
    nq_tune_abstains = abstains(nq_best, nq_unknown, below, floor)
    result = {"k": args.k, "below": below, "floor": floor, "tuning": rates(yes, no, len(tune)),
              "test": rates(test_yes, test_no, len(test)),
              "nq_tuning": {"n": len(nq_best), "abstained": 100 * float(nq_tune_abstains.mean()),
                            "abstained_answer_retrieved": 100 * float(nq_tune_abstains[nq_retrieved].mean())},
              "accuracy": []}

    by_id = {q.id: q for q in nq_all}
    for name, questions, folder, retriever, known in (
            ("own documents (test)", test, Path(args.owndocs_predictions), answerable, test_yes),
            ("NQ-500", None, Path(args.nq_predictions), nq_retriever, None)):
        for reader in args.readers.split(","):
            path = folder / f"{reader}.jsonl"
            if not path.exists():
                continue
            predictions = read_predictions(path)
            if questions is None:  # NQ: the questions the predictions answer, in their order
                questions = [by_id[qid] for qid in predictions if qid in by_id]
                known = signals(questions, retriever, args.k)
            if any(q.id not in predictions for q in questions):
                continue
            correct = np.array([predictions[q.id]["substring_em"] for q in questions], dtype=float)
            refused = abstains(known[0], known[1], below, floor)
            result["accuracy"].append({
                "benchmark": name, "reader": reader, "n": len(questions),
                "abstained": 100 * float(refused.mean()),
                "abstained_answer_retrieved": 100 * float(refused[known[2]].mean()),
                "substring_em": 100 * float(correct.mean()),
                "substring_em_after": 100 * float((correct * ~refused).mean())})

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abstention.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"floor {floor:.2f} (chosen on {len(nq_best)} NQ questions 501+), below {below:.2f} (chosen on "
             f"{len(tune)} own-documents tuning questions); cosine of the best of {args.k} passages", "",
             "| questions | n | abstained on unanswerable | abstained on answerable |", "|---|---|---|---|",
             f"| own documents, tuning | {len(tune)} | {result['tuning']['abstained_unanswerable']:.1f}% | "
             f"{result['tuning']['abstained_answerable']:.1f}% |",
             f"| own documents, test | {len(test)} | {result['test']['abstained_unanswerable']:.1f}% | "
             f"{result['test']['abstained_answerable']:.1f}% |", "",
             "| benchmark | reader | n | abstained | abstained where the answer was retrieved | substring EM | "
             "after abstention |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['reader']} | {r['n']} | {r['abstained']:.1f}% | "
              f"{r['abstained_answer_retrieved']:.1f}% | {r['substring_em']:.1f} | {r['substring_em_after']:.1f} |"
              for r in result["accuracy"]]
    (args.out / "abstention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
