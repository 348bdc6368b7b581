"""Retrieval for follow-up questions in a conversation (`cepe-rag chat`): which query finds the right document?

From the own-documents questions (invented entities, one Markdown file each; indexed among ~10,000 real passages),
two-turn conversations are made per entity:
  - follow-ups: its first question, then each other question with the entity's name replaced by a pronoun
    ("Who designed the Virkdeisund Bridge?" -> "When did it open?");
  - topic switches: its first question, then a question that names another entity.
For the second turn, three rules are compared by whether the gold file is in the top 1 / top k:
  alone (the question as typed), joined (the previous question + the question), best-of-two (both searched; the
  ranking whose best passage is more similar to its query wins), and chat's rule (RagSession: a question that names
  its subject, a capitalised word after the first, is searched alone; any other by best-of-two).
Here every switch names its entity and no follow-up does, so chat's rule separates them by construction; the trap it
avoids (a new subject that the earlier subject's passage names) is in tests/pipelines/test_session.py.

    python benchmarks/follow_up_retrieval.py --index indexes/owndocs --questions runs/owndocs/questions.tune.jsonl \
        --out benchmarks/results/follow_up
"""

from __future__ import annotations

import argparse
import json
import re
from itertools import groupby
from pathlib import Path

from cepe_rag.pipelines.session import follow_up_search
from cepe_rag.retrieval import Retriever, relevance

SHE = {"Maria", "Elena", "Ingrid", "Lucia", "Nadia", "Helena", "Clara", "Greta", "Sofia", "Alma", "Irena", "Marta",
       "Vera", "Ilse", "Lena"}


def pronoun_question(question: str, entity: str, kind: str) -> str:
    """The question as a follow-up asks it: the entity's name replaced by a pronoun."""
    pronoun = ("she" if entity.split()[0] in SHE else "he") if kind == "person" else "it"
    return re.sub(rf"\b(the )?{re.escape(entity)}\b", pronoun, question)


def conversations(questions: list[dict]) -> list[dict]:
    entities = [list(group) for _, group in groupby(questions, key=lambda q: q["entity"])]
    cases = []
    for position, group in enumerate(entities):
        first = group[0]
        for later in group[1:]:
            cases.append({"kind": "follow-up", "earlier": first["question"], "source": later["source"],
                          "question": pronoun_question(later["question"], later["entity"], later["kind"])})
        other = entities[(position + 1) % len(entities)][1]
        cases.append({"kind": "switch", "earlier": first["question"], "question": other["question"],
                      "source": other["source"]})
    return cases


def best_of_two(retriever: Retriever, case: dict, k: int):
    """Both searched, whatever the question names; the ranking whose best passage is more similar wins."""
    alone, joined = retriever.retrieve_batch([case["question"], f"{case['earlier']} {case['question']}"], k)
    return joined if relevance(joined) > relevance(alone) else alone


def found(passages, source: str, depth: int) -> bool:
    return any(p.source.endswith("/" + source) or p.source == source for p in passages[:depth])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="indexes/owndocs")
    parser.add_argument("--questions", default="runs/owndocs/questions.tune.jsonl")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/follow_up"))
    args = parser.parse_args()
    questions = [json.loads(line) for line in Path(args.questions).read_text().splitlines() if line.strip()]
    cases = conversations(questions)
    retriever = Retriever(args.index)
    rules = {"alone": lambda c: retriever.retrieve(c["question"], args.k),
             "joined": lambda c: retriever.retrieve(f"{c['earlier']} {c['question']}", args.k),
             "best-of-two": lambda c: best_of_two(retriever, c, args.k),
             "chat's rule": lambda c: follow_up_search(retriever, c["question"], c["earlier"], args.k)[0]}
    rows = []
    for kind in ("follow-up", "switch"):
        chosen = [c for c in cases if c["kind"] == kind]
        for rule, search in rules.items():
            rankings = [search(c) for c in chosen]
            rows.append({"cases": kind, "rule": rule, "n": len(chosen),
                         "top1": round(100 * sum(found(r, c["source"], 1) for r, c in zip(rankings, chosen))
                                       / len(chosen), 1),
                         f"top{args.k}": round(100 * sum(found(r, c["source"], args.k)
                                                         for r, c in zip(rankings, chosen)) / len(chosen), 1)})
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"index": args.index, "questions": args.questions, "k": args.k, "examples": cases[:4], "rows": rows}
    (args.out / "follow_up.json").write_text(json.dumps(result, indent=2) + "\n")
    table = [f"| second turn | rule | n | gold file top-1 (%) | gold file top-{args.k} (%) |", "|---|---|---|---|---|"]
    table += [f"| {r['cases']} | {r['rule']} | {r['n']} | {r['top1']} | {r[f'top{args.k}']} |" for r in rows]
    (args.out / "follow_up.md").write_text("\n".join(table) + "\n")
    print(json.dumps(rows, indent=2))
    print("\n".join(table))


if __name__ == "__main__":
    main()
