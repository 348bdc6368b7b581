"""Sweep APE's knobs (attention temperature, context log-sum-exp scale) for the parallel reader on the QA harness.

    python benchmarks/ape_sweep.py --index indexes/default --limit 60 --k 20 --out runs/ape_sweep
    python benchmarks/ape_sweep.py --index indexes/owndocs --questions runs/owndocs/questions.tune.jsonl \\
        --limit 60 --k 20 --dtype bfloat16 --out runs/owndocs_tune/ape

Questions: the answer-in-corpus subset of --questions, first --limit (tune on questions outside the test set);
greedy, <= 25 new tokens, cut at the first newline. Concat and closed-book run on the same questions for
reference (--no-baselines to skip them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cepe_rag.eval import answerable_subset, load_questions, run_eval
from cepe_rag.models import load_decoder
from cepe_rag.pipelines.session import RagSession
from cepe_rag.readers import ClosedBookReader, ConcatReader, GenerationConfig, ParallelReader
from cepe_rag.retrieval import Retriever

NQ_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq_open" / "NQ-open.dev.jsonl"
SETTINGS = "1.0:1.0,0.8:1.0,1.0:0.8,1.0:0.6,0.8:0.6,1.0:0.4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", default="indexes/default")
    parser.add_argument("--questions", default=str(NQ_DEV))
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--k", default="20")
    parser.add_argument("--settings", default=SETTINGS, help="temperature:scale pairs, comma-separated")
    parser.add_argument("--prompt", default="instruction", help="instruction or fewshot")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--concat-order", default="first", help="concat: most relevant passage first or last")
    parser.add_argument("--out", default="runs/ape_sweep")
    args = parser.parse_args()
    retriever = Retriever(args.index)
    questions = answerable_subset(load_questions(args.questions), retriever)[: args.limit]
    model, tokenizer = load_decoder(dtype=getattr(torch, args.dtype))
    common = {"generation": GenerationConfig(max_new_tokens=25, stop_strings=("\n",)), "prompt_style": args.prompt}
    pairs = [tuple(float(x) for x in pair.split(":")) for pair in args.settings.split(",") if pair]
    readers = {f"parallel-T{t}-S{s}": ParallelReader(model, tokenizer, ape_temperature=t, ape_scale=s, **common)
               for t, s in pairs}
    if not args.no_baselines:
        readers["concat"] = ConcatReader(model, tokenizer, most_relevant=args.concat_order, **common)
        readers["closed-book"] = ClosedBookReader(model, tokenizer, **common)
    run_eval(questions, RagSession(readers, retriever), [int(k) for k in args.k.split(",")], args.out)
    print((Path(args.out) / "summary.md").read_text())


if __name__ == "__main__":
    main()
