"""Retrieval recall@k of dense, lexical (BM25) and hybrid search on a QA file, with paired 95% intervals.

    python benchmarks/retrieval_recall.py --questions ../shared/data/nq_open/NQ-open.dev.jsonl \
        --index indexes/default --answer-in-corpus --out benchmarks/results/retrieval/nq
    python benchmarks/retrieval_recall.py --questions runs/owndocs/questions.test.jsonl \
        --index indexes/owndocs --out benchmarks/results/retrieval/owndocs

recall@k: a normalised gold answer occurs in one of the top k passages (the QA harness's definition).
Writes recall.json and recall.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cepe_rag.eval.data import load_questions
from cepe_rag.eval.metrics import answer_in_passages, paired_bootstrap
from cepe_rag.eval.runner import answerable_subset
from cepe_rag.retrieval import Retriever
from cepe_rag.settings import RETRIEVAL_MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--index", default="indexes/default")
    parser.add_argument("--answer-in-corpus", action="store_true")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--k", default="5,20,50")
    parser.add_argument("--modes", default=",".join(RETRIEVAL_MODES),
                        help="dense, lexical, hybrid, or hybrid:W (BM25's weight W in the fusion)")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N questions (a tuning slice)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ks = sorted(int(k) for k in args.k.split(","))
    modes = args.modes.split(",")

    embedder = None
    questions = load_questions(args.questions)
    retrievers = {}
    for mode in modes:
        name, _, weight = mode.partition(":")
        retrievers[mode] = Retriever(args.index, embedder, mode=name,
                                     **({"lexical_weight": float(weight)} if weight else {}))
        embedder = embedder or retrievers[mode].embedder
    if args.answer_in_corpus:
        questions = answerable_subset(questions, retrievers[modes[0]])
    questions = questions[args.skip:]
    if args.limit:
        questions = questions[:args.limit]

    hits: dict[str, dict[int, list[float]]] = {}
    seconds = {}
    for mode, retriever in retrievers.items():
        started = time.perf_counter()
        found = retriever.retrieve_batch([q.question for q in questions], max(ks))
        seconds[mode] = (time.perf_counter() - started) / len(questions)
        hits[mode] = {k: [float(answer_in_passages([p.title + " " + p.text for p in passages[:k]], q.answers))
                          for q, passages in zip(questions, found)] for k in ks}

    rows = [{"mode": mode, "n": len(questions), "ms_per_question": 1000 * seconds[mode],
             **{f"recall@{k}": 100 * sum(hits[mode][k]) / len(questions) for k in ks}} for mode in modes]
    pairs = []
    for first, second in [(m, "dense") for m in modes if m != "dense"] + [("hybrid", "lexical")]:
        if first in hits and second in hits:
            for k in ks:
                mean, low, high = paired_bootstrap(hits[first][k], hits[second][k])
                pairs.append({"first": first, "second": second, "k": k, "delta": mean, "low": low, "high": high})

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"questions": args.questions, "index": args.index, "answer_in_corpus": args.answer_in_corpus,
              "skip": args.skip, "limit": args.limit,
              "rows": rows, "paired": pairs}
    (args.out / "recall.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| retrieval | n | " + " | ".join(f"recall@{k}" for k in ks) + " | ms/question |",
             "|---|---|" + "---|" * len(ks) + "---|"]
    lines += [f"| {r['mode']} | {r['n']} | " + " | ".join(f"{r[f'recall@{k}']:.1f}" for k in ks)
              + f" | {r['ms_per_question']:.1f} |" for r in rows]
    lines += ["", "| first | second | k | Δ recall (95% CI) |", "|---|---|---|---|"]
    lines += [f"| {p['first']} | {p['second']} | {p['k']} | {p['delta']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}] |"
              for p in pairs]
    (args.out / "recall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
