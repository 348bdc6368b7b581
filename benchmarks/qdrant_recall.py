"""Dense recall@k of two index folders holding the same passages and embeddings (FAISS Flat and its Qdrant copy),
and how far their rankings agree, question by question.

    cepe-rag index --from-index indexes/default --index indexes/qdrant-default --store qdrant
    python benchmarks/qdrant_recall.py --questions ../shared/data/nq_open/NQ-open.dev.jsonl --answer-in-corpus \
        --limit 100 --index indexes/default --against indexes/qdrant-default \
        --out benchmarks/results/scaling/qdrant_recall

recall@k: a normalised gold answer occurs in one of the top k passages (the QA harness's definition). Passages are
compared by (source, title, text): the two stores number them differently. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cepe_rag.eval.data import load_questions
from cepe_rag.eval.metrics import answer_in_passages
from cepe_rag.eval.runner import answerable_subset
from cepe_rag.retrieval import Retriever

TIE = 1e-5  # cosine similarities closer than this are ties (float32 sums in another order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--index", default="indexes/default", help="the reference (FAISS Flat)")
    parser.add_argument("--against", required=True, help="the copy (e.g. a Qdrant index folder)")
    parser.add_argument("--answer-in-corpus", action="store_true")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--k", default="1,5,20,50")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    ks = sorted(int(k) for k in args.k.split(","))

    reference = Retriever(args.index, mode="dense")
    other = Retriever(args.against, embedder=reference.embedder, mode="dense")
    questions = load_questions(args.questions)
    if args.answer_in_corpus:
        questions = answerable_subset(questions, reference)
    questions = questions[:args.limit] if args.limit else questions
    texts = [q.question for q in questions]

    rows, found = [], {}
    for name, path, retriever in (("reference", args.index, reference), ("against", args.against, other)):
        retriever.retrieve_batch(texts[:1], max(ks))  # warm-up
        started = time.perf_counter()
        found[name] = retriever.retrieve_batch(texts, max(ks))
        seconds = (time.perf_counter() - started) / len(texts)
        rows.append({"index": path,
                     "store": retriever.store.backend, "passages": retriever.store.count(), "n": len(texts),
                     "ms_per_question": 1000 * seconds,
                     **{f"recall@{k}": 100 * sum(answer_in_passages([p.title + " " + p.text for p in ranking[:k]],
                                                                    q.answers)
                                                 for q, ranking in zip(questions, found[name])) / len(texts)
                        for k in ks}})

    def key(p):
        return p.source, p.title, p.text

    agreement = {}
    for k in ks:
        same_order = same_set = tie_only = 0
        for a, b in zip(found["reference"], found["against"]):
            a, b = a[:k], b[:k]
            same_order += [key(p) for p in a] == [key(p) for p in b]
            if {key(p) for p in a} == {key(p) for p in b}:
                same_set += 1
            elif abs(a[-1].score - b[-1].score) < TIE:  # only the passages tied at the k-th score differ
                tie_only += 1
        agreement[f"top{k}"] = {"same_order": same_order, "same_set": same_set,
                                "different_only_by_a_tie_at_k": tie_only, "different": len(texts) - same_set - tie_only}
    largest = 0.0  # between the two stores' cosine similarities of the same passage to the same question
    for a, b in zip(found["reference"], found["against"]):
        scores = {key(p): p.score for p in a}
        largest = max([largest] + [abs(scores[key(p)] - p.score) for p in b if key(p) in scores])

    result = {"command": "python " + " ".join(sys.argv), "questions": args.questions, "n": len(texts),
              "answer_in_corpus": args.answer_in_corpus, "limit": args.limit, "retrieval": "dense",
              "rows": rows, "agreement": agreement, "largest_score_difference_same_passage": largest,
              "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "load_average_1min_at_end": os.getloadavg()[0]}  # timings are only as good as the machine was idle
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"`{result['command']}` ({result['date']}; {result['cpus']} CPUs, load average "
             f"{result['load_average_1min_at_end']:.1f})", "",
             "| index | store | passages | n | " + " | ".join(f"recall@{k}" for k in ks) + " | ms/question |",
             "|---|---|---|---|" + "---|" * len(ks) + "---|"]
    lines += [f"| {r['index']} | {r['store']} | {r['passages']} | {r['n']} | "
              + " | ".join(f"{r[f'recall@{k}']:.1f}" for k in ks) + f" | {r['ms_per_question']:.1f} |" for r in rows]
    lines += ["", "| top k | same passages, same order | same passages | differ only by a tie at k | differ |",
              "|---|---|---|---|---|"]
    lines += [f"| {k} | {a['same_order']} | {a['same_set']} | {a['different_only_by_a_tie_at_k']} | {a['different']} |"
              for k, a in ((k, agreement[f"top{k}"]) for k in ks)]
    lines += ["", f"Largest cosine difference for the same passage: {largest:.2e}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
