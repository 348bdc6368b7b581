"""Choose and measure the relevance cutoff: read the passages whose cosine is within `margin` of the best one's.

    python benchmarks/relevance_cutoff.py --out benchmarks/results/cutoff/tune            # choose (tuning sets)
    python benchmarks/relevance_cutoff.py --split test --caps 5 --margins 0.1,inf \\
        --out benchmarks/results/cutoff/test                                                # measure (test sets)

Tuning sets: the own-documents tuning questions (indexes/owndocs) and NQ-open dev answer-in-corpus questions
after the first 500 (the NQ-500 benchmark); test sets: the own-documents test questions and NQ-500. For every
question the top `cap` passages are retrieved once (hybrid); each (cap, margin) keeps a subset of them, and the
reader answers every distinct subset once (a margin of `inf` is fixed k = cap). Substring EM per set, passages
read, and paired 95% bootstrap intervals against fixed k = 5 (today's default) go to `--out` as JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from cepe_rag.eval.data import load_questions
from cepe_rag.eval.metrics import paired_bootstrap, postprocess, substring_match
from cepe_rag.eval.runner import answerable_subset
from cepe_rag.models import resolve_dtype
from cepe_rag.readers import GenerationConfig, build_reader
from cepe_rag.readers.base import read_selection
from cepe_rag.retrieval import Retriever
from cepe_rag.settings import ReaderSpec


def question_sets(split: str, args) -> dict[str, tuple[list, Retriever]]:
    owndocs = Retriever(args.owndocs_index)
    nq_retriever = Retriever(args.nq_index, owndocs.embedder)
    nq = answerable_subset(load_questions(args.nq_questions), nq_retriever)
    nq = nq[500:500 + args.nq_limit] if split == "tune" else nq[:500]
    return {"owndocs": (load_questions(f"runs/owndocs/questions.{split}.jsonl")[: args.owndocs_limit or None], owndocs),
            "nq": (nq, nq_retriever)}


def add_question_set_options(parser: argparse.ArgumentParser, *, nq_limit: int) -> None:
    """The options `question_sets` reads: where the two sets' indexes and NQ questions are, and how many to take."""
    parser.add_argument("--split", choices=("tune", "test"), default="tune")
    parser.add_argument("--owndocs-index", default="indexes/owndocs")
    parser.add_argument("--nq-index", default="indexes/default")
    parser.add_argument("--nq-questions", default="../shared/data/nq_open/NQ-open.dev.jsonl")
    parser.add_argument("--nq-limit", type=int, default=nq_limit)
    parser.add_argument("--owndocs-limit", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", default="concat")
    parser.add_argument("--caps", default="5,10")
    parser.add_argument("--margins", default="0,0.05,0.1,0.15,0.2,0.3,inf")
    add_question_set_options(parser, nq_limit=200)
    parser.add_argument("--cepe-model", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    # read_margin=None: the reader reads exactly the subset chosen here, not its own default cutoff of it
    spec = ReaderSpec(reader=args.reader, cepe_model=args.cepe_model, read_margin=None)
    reader = build_reader(spec, dtype=resolve_dtype(None, "cpu"),
                          generation=GenerationConfig(max_new_tokens=25, stop_strings=("\n",)))
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / f"answers_{args.reader}.jsonl"
    answers = {}
    if cache_path.exists():
        for line in cache_path.read_text().splitlines():
            record = json.loads(line)
            answers[(record["set"], record["id"], tuple(record["passages"]))] = record["prediction"]
    rows, scores = [], {}
    with cache_path.open("a") as cache:
        for name, (questions, retriever) in question_sets(args.split, args).items():
            found = retriever.retrieve_batch([q.question for q in questions], max(caps))
            for cap in caps:
                for margin in margins:
                    correct, read, started = [], [], time.perf_counter()
                    for question, passages in zip(questions, found):
                        kept = read_selection(passages[:cap], margin)[0]
                        key = (name, question.id, tuple(p.id for p in kept))
                        if key not in answers:
                            answers[key] = postprocess(reader.answer(question.question, kept).text)
                            cache.write(json.dumps({"set": name, "id": question.id, "passages": list(key[2]),
                                                    "prediction": answers[key]}) + "\n")
                            cache.flush()
                        correct.append(substring_match(answers[key], question.answers))
                        read.append(len(kept))
                    scores[(name, cap, margin)] = correct
                    rows.append({"set": name, "n": len(questions), "cap": cap, "margin": margin,
                                 "substring_em": round(100 * sum(correct) / len(correct), 1),
                                 "passages_read": round(sum(read) / len(read), 2),
                                 "s": round(time.perf_counter() - started, 1)})
                    print(json.dumps(rows[-1]), flush=True)
    for row in rows:  # paired against fixed k = 5, where measured
        base = scores.get((row["set"], 5, math.inf))
        if base is not None and (row["cap"], row["margin"]) != (5, math.inf):
            low, high = paired_bootstrap(scores[(row["set"], row["cap"], row["margin"])], base)[1:]
            row["vs_k5"] = [round(low, 1), round(high, 1)]
    (args.out / f"{args.reader}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| set | n | cap (--k) | margin | substring EM | passages read | vs fixed k=5, paired 95% |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['n']} | {r['cap']} | {r['margin']} | {r['substring_em']} | {r['passages_read']} | "
              f"{r.get('vs_k5', '')} |" for r in rows]
    (args.out / f"{args.reader}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
