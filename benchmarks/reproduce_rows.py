"""Check that a change left answers unchanged: re-answer the first N own-documents test and NQ-500 questions through
today's question path (`RagSession.answer`, default `ask` settings: concat, `--k 5`, relevance cutoff, sentence
focus, bfloat16 where the CPU has it) and compare each answer with the one recorded when the README's headline row
was measured (benchmarks/results/focus/test/answers_concat_focus.jsonl, `sentence_focus.py --split test`; before
sentence focus, benchmarks/results/cutoff/test/answers_concat.jsonl with `--no-focus`).

    python benchmarks/reproduce_rows.py --limit 40 --out benchmarks/results/reproduce
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relevance_cutoff import question_sets  # noqa: E402

from cepe_rag.eval.metrics import postprocess, substring_match  # noqa: E402
from cepe_rag.pipelines.session import RagSession  # noqa: E402
from cepe_rag.readers import GenerationConfig  # noqa: E402
from cepe_rag.readers.base import read_selection  # noqa: E402
from cepe_rag.settings import ReaderSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--recorded", type=Path,
                        default=Path("benchmarks/results/focus/test/answers_concat_focus.jsonl"))
    parser.add_argument("--no-focus", action="store_true", help="answer without sentence focus (the cutoff's record)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reproduce"))
    args = parser.parse_args()
    recorded = {}
    for line in args.recorded.read_text().splitlines():
        row = json.loads(line)
        recorded[(row["set"], row["id"], tuple(row["passages"]))] = row["prediction"]
    options = argparse.Namespace(owndocs_index="indexes/owndocs", nq_index="indexes/default", owndocs_limit=0,
                                 nq_questions="../shared/data/nq_open/NQ-open.dev.jsonl", nq_limit=500)
    summary = {}
    for name, (questions, retriever) in question_sets("test", options).items():
        session = RagSession.open(None, [ReaderSpec(focus=not args.no_focus)], retriever=retriever, abstain=False,
                                  generation=GenerationConfig(max_new_tokens=25, stop_strings=("\n",)))
        same, correct_then, correct_now, rows = 0, 0, 0, []
        for question in questions[: args.limit]:
            top = retriever.retrieve(question.question, 5)
            then = recorded[(name, question.id, tuple(p.id for p in read_selection(top, 0.0)[0]))]
            now = postprocess(session.answer(question.question, passages=top).text)
            same += now == then
            correct_then += substring_match(then, question.answers)
            correct_now += substring_match(now, question.answers)
            rows.append({"id": question.id, "then": then, "now": now})
        n = len(rows)
        summary[name] = {"n": n, "identical_answers": same, "substring_em_then": round(100 * correct_then / n, 1),
                         "substring_em_now": round(100 * correct_now / n, 1)}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(name, json.dumps(summary[name]), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
