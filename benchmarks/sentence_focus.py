"""Measure sentence focus (cepe_rag/retrieval/focus.py) against reading passages as they are, at the default
relevance cutoff (margin 0, up to --k 5):

    python benchmarks/sentence_focus.py --split tune --out benchmarks/results/focus/tune   # decide (tuning sets)
    python benchmarks/sentence_focus.py --split test --out benchmarks/results/focus/test   # report (test sets)

The question sets are relevance_cutoff.py's (own-documents tuning/test questions; NQ-open answer-in-corpus questions
after the first 500 / the NQ-500 benchmark). Passages are retrieved once (hybrid, top 5) and cut by the default rule;
the reader answers them as they are and with sentence focus (each led by its sentence most similar to the question;
where focus changes nothing, the prompt is the same and so is the greedy answer, which is not decoded twice).
Answers as they are come from relevance_cutoff.py's cache when it holds them (`--plain-cache`), else are computed and
added to this run's cache. Substring EM, and paired 95% bootstrap intervals of focus minus plain (and minus fixed
k=5, every passage read, where that cache holds it), go to `--out` (JSON + table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from relevance_cutoff import add_question_set_options, question_sets  # noqa: E402

from cepe_rag.eval.metrics import paired_bootstrap, postprocess, substring_match  # noqa: E402
from cepe_rag.models import resolve_dtype  # noqa: E402
from cepe_rag.readers import GenerationConfig, build_reader  # noqa: E402
from cepe_rag.readers.base import read_selection  # noqa: E402
from cepe_rag.retrieval.focus import focus_passages  # noqa: E402
from cepe_rag.settings import DEFAULT_K, DEFAULT_READ_MARGIN, ReaderSpec  # noqa: E402


def load_cache(path: Path) -> dict:
    answers = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            answers[(record["set"], record["id"], tuple(record["passages"]))] = record["prediction"]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", default="concat")
    add_question_set_options(parser, nq_limit=150)
    parser.add_argument("--plain-cache", type=Path, default=None,
                        help="relevance_cutoff.py's answers (default: benchmarks/results/cutoff/<split>/)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plain_cache = args.plain_cache or Path(f"benchmarks/results/cutoff/{args.split}/answers_{args.reader}.jsonl")
    # read_margin=None: the reader reads exactly the passages chosen here (the default rule, applied below)
    reader = build_reader(ReaderSpec(reader=args.reader, read_margin=None), dtype=resolve_dtype(None, "cpu"),
                          generation=GenerationConfig(max_new_tokens=25, stop_strings=("\n",)))
    caches = {"plain": args.out / f"answers_{args.reader}_plain.jsonl",
              "focus": args.out / f"answers_{args.reader}_focus.jsonl"}
    answers = {"plain": {**load_cache(plain_cache), **load_cache(caches["plain"])},
               "focus": load_cache(caches["focus"])}
    rows = []
    for name, (questions, retriever) in question_sets(args.split, args).items():
        found = retriever.retrieve_batch([q.question for q in questions], DEFAULT_K)
        correct = {"plain": [], "focus": []}
        fixed_k5 = []  # every retrieved passage read, as plain-cached by relevance_cutoff.py (--margins inf)
        for question, passages in zip(questions, found):
            every = answers["plain"].get((name, question.id, tuple(p.id for p in passages)))
            fixed_k5.append(None if every is None else substring_match(every, question.answers))
            kept = read_selection(passages, DEFAULT_READ_MARGIN)[0]
            key = (name, question.id, tuple(p.id for p in kept))
            focused = focus_passages(question.question, kept, retriever.embedder)
            for variant in ("plain", "focus"):
                if key not in answers[variant] and variant == "focus" and all(p.focused_text is None for p in focused):
                    answers[variant][key] = answers["plain"][key]  # the same prompt: the same greedy answer
                elif key not in answers[variant]:
                    read = focused if variant == "focus" else kept
                    answers[variant][key] = postprocess(reader.answer(question.question, read).text)
                    with caches[variant].open("a") as cache:
                        cache.write(json.dumps({"set": name, "id": question.id, "passages": list(key[2]),
                                                "prediction": answers[variant][key]}) + "\n")
                correct[variant].append(substring_match(answers[variant][key], question.answers))
        _, low, high = paired_bootstrap(correct["focus"], correct["plain"])
        rows.append({"set": name, "n": len(questions),
                     "plain": round(100 * sum(correct["plain"]) / len(questions), 1),
                     "focus": round(100 * sum(correct["focus"]) / len(questions), 1),
                     "focus_minus_plain_95": [round(low, 1), round(high, 1)]})
        if None not in fixed_k5:
            _, low, high = paired_bootstrap(correct["focus"], fixed_k5)
            rows[-1].update(fixed_k5=round(100 * sum(fixed_k5) / len(questions), 1),
                            focus_minus_fixed_k5_95=[round(low, 1), round(high, 1)])
        print(json.dumps(rows[-1]), flush=True)
    (args.out / f"{args.reader}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| set | n | fixed k=5 | cutoff, as retrieved | cutoff + sentence focus | focus − as retrieved, paired 95%"
             " | focus − fixed k=5, paired 95% |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['n']} | {r.get('fixed_k5', '')} | {r['plain']} | {r['focus']} | "
              f"{r['focus_minus_plain_95']} | {r.get('focus_minus_fixed_k5_95', '')} |" for r in rows]
    (args.out / f"{args.reader}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
