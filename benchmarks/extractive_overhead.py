"""What extractive decoding costs per question: the same reader with it on and off, alternating question by question
in one process (so that load on a shared machine falls on both alike), on retrieved own-documents passages.

    python benchmarks/extractive_overhead.py --reader cepe --k 20 --limit 40 --out benchmarks/results/extractive

Prints a table and writes overhead_<reader>_k<k>.json: seconds per question and per decoding step, each setting's
tokens generated, and the ratio. Answers differ between the two settings (that is the point), so seconds per
decoding step is the fair comparison of the constraint's own cost; seconds per question is what a user sees.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cepe_rag.eval.data import load_questions
from cepe_rag.indexes import open_store
from cepe_rag.models import resolve_dtype
from cepe_rag.readers import GenerationConfig, build_reader
from cepe_rag.retrieval import Retriever
from cepe_rag.settings import ReaderSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reader", default="cepe")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--questions", default="runs/owndocs/questions.tune.jsonl")
    parser.add_argument("--index", default="indexes/owndocs")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="benchmarks/results/extractive")
    args = parser.parse_args()

    questions = load_questions(args.questions)[: args.limit]
    passages = Retriever(open_store(args.index)).retrieve_batch([q.question for q in questions], args.k)
    generation = GenerationConfig(max_new_tokens=25, stop_strings=("\n",))
    readers = {setting: build_reader(ReaderSpec(reader=args.reader, read_margin=None, focus=False,
                                                extractive=setting), generation=generation,
                                     dtype=resolve_dtype(args.dtype, "cpu"))
               for setting in (False, True)}
    readers[False].answer(questions[0].question, passages[0])  # warm-up: kernels, caches, lazy tables
    readers[True].answer(questions[0].question, passages[0])
    totals = {setting: {"seconds": 0.0, "steps": 0} for setting in readers}
    for number, (question, found) in enumerate(zip(questions, passages)):
        for setting in ((False, True) if number % 2 else (True, False)):  # neither always second
            started = time.perf_counter()
            answer = readers[setting].answer(question.question, found)
            totals[setting]["seconds"] += time.perf_counter() - started
            totals[setting]["steps"] += answer.usage["decode_steps"]
    rows = {("extractive" if setting else "free"): {
        "seconds_per_question": round(t["seconds"] / len(questions), 3),
        "seconds_per_step": round(t["seconds"] / max(t["steps"], 1), 4),
        "steps_per_question": round(t["steps"] / len(questions), 2)} for setting, t in totals.items()}
    result = {"reader": args.reader, "k": args.k, "questions": len(questions), "dtype": args.dtype, **rows,
              "ratio_per_question": round(rows["extractive"]["seconds_per_question"]
                                          / rows["free"]["seconds_per_question"], 3),
              "ratio_per_step": round(rows["extractive"]["seconds_per_step"] / rows["free"]["seconds_per_step"], 3)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"overhead_{args.reader}_k{args.k}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("| decoding | s/question | s/step | steps/question |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds_per_question']} | {row['seconds_per_step']} | {row['steps_per_question']} |")


if __name__ == "__main__":
    main()
