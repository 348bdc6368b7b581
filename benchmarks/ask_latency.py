"""Latency of `ask` on an index: retrieval and generation measured separately, per reader.

    python benchmarks/ask_latency.py --index indexes/default [--k 20] [--readers concat,parallel,closed-book]

Models are loaded once (load time reported apart); each question is answered greedily, <= 64 new tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from cepe_rag.models import load_decoder
from cepe_rag.pipelines.session import RagSession
from cepe_rag.readers import GenerationConfig, make_reader
from cepe_rag.retrieval import Retriever

QUESTIONS = ["Who directed 2001: A Space Odyssey?", "What is the capital of Australia?",
             "Who wrote Pride and Prejudice?", "When did the Berlin Wall fall?", "Who painted the Mona Lisa?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", default="indexes/default")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--readers", default="concat,parallel,closed-book")
    args = parser.parse_args()
    started = time.perf_counter()
    retriever = Retriever(args.index)
    model, tokenizer = load_decoder()
    load_s = time.perf_counter() - started
    rows = []
    for name in args.readers.split(","):
        reader = make_reader(name, model, tokenizer, generation=GenerationConfig(max_new_tokens=64))
        session = RagSession(reader, retriever, k=args.k)
        answers = [session.answer(q) for q in QUESTIONS]
        rows.append({
            "reader": name, "k": args.k if name != "closed-book" else 0,
            "retrieval_ms": round(1000 * statistics.median(a.timings["retrieval_s"] for a in answers), 1),
            "first_token_s": round(statistics.median(a.timings["first_token_s"] for a in answers), 2),
            "generation_s": round(statistics.median(a.timings["total_s"] for a in answers), 2),
            "tokens": round(statistics.median(a.usage["decode_steps"] for a in answers)),
            "prompt_tokens": round(statistics.median(a.usage["prompt_tokens"] for a in answers)),
        })
    print(json.dumps({"load_s": round(load_s, 2), "passages_in_index": retriever.store.count(), "rows": rows},
                     indent=2))
    print("\n| reader | k | retrieval (ms) | first token (s) | generation (s) | tokens generated | prompt tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reader']} | {r['k']} | {r['retrieval_ms']} | {r['first_token_s']} | {r['generation_s']} | "
              f"{r['tokens']} | {r['prompt_tokens']} |")


if __name__ == "__main__":
    main()
