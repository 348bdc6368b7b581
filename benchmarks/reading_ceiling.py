"""How far can a reader get on real questions when it reads the right passage? (issue 28's NQ bar)

    python benchmarks/reading_ceiling.py --run runs/eqa/card --readers cepe,concat-extractive,concat \\
        --out benchmarks/results/reading_ceiling

For every question of an evaluation run folder (`cepe-rag eval --out RUN`: its retrieval cache and questions), the
first of its top-`--depth` passages that holds a gold answer (as whole words) is read alone (k = 1) by each reader.
The figures split a reader's end-to-end accuracy into the two things it needs: the right passage among those it
reads (the share of questions whose top passage by the relevance prior's cosine holds an answer, and whose top
`--depth` do, and the relevance prior's mass on the holders at each `--temperatures`) and the right span in that
passage (accuracy reading the holder alone). Writes `summary.json` and a
table (`summary.md`) to `--out`; answers are cached in `answers.jsonl` there, so a re-run only answers what is new.

With `--each N` the first reader also reads each of every question's top N passages alone (cached in `each.jsonl`),
which bounds what any choice among its passages could give: the share of questions where some passage's own answer
is exactly right, and what a vote over those answers gets (each weighted by the relevance prior at `--vote-temperature`,
or counted).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from cepe_rag.eval.metrics import exact_match, normalize_answer, postprocess, substring_match
from cepe_rag.indexes import open_store
from cepe_rag.models import resolve_dtype
from cepe_rag.readers import GenerationConfig, build_reader
from cepe_rag.settings import ReaderSpec


def spec_for(name: str) -> ReaderSpec:
    reader, _, variant = name.partition("-")
    extractive = {"extractive": True, "free": False, "": None}[variant]
    return ReaderSpec(reader=reader, read_margin=None, focus=False, extractive=extractive)


def holds_answer(passage, answers: list[str]) -> bool:
    text = f" {normalize_answer(passage.title + ' ' + passage.text)} "
    return any(f" {normalize_answer(a)} " in text for a in answers if normalize_answer(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a `cepe-rag eval` run folder")
    parser.add_argument("--readers", default="cepe,concat-extractive,concat")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--temperatures", default="0.01,0.03,0.1,0.3,1.0",
                        help="relevance-prior temperatures whose mass on answer-holding passages is reported")
    parser.add_argument("--each", type=int, default=0, help="also read each of the top N passages alone")
    parser.add_argument("--vote-temperature", type=float, default=0.01)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    run = json.loads((args.run / "run.json").read_text())
    store = open_store(run["retrieval"]["index"])
    rows = [json.loads(line) for line in (args.run / "retrieval.jsonl").read_text().splitlines()]
    predictions = next((args.run / "predictions").glob("*.jsonl"))
    questions = {r["id"]: r for r in map(json.loads, predictions.read_text().splitlines())}
    rows = [r for r in rows if r["id"] in questions]
    cases, top_holds, any_holds = [], 0, 0
    prior_mass = dict.fromkeys(temperatures, 0.0)
    for row in rows:
        hits = row["hits"][: args.depth]
        passages = store.passages([h[0] for h in hits])
        answers = questions[row["id"]]["answers"]
        holders = [h[0] for h in hits if holds_answer(passages[h[0]], answers)]
        top_dense = max(hits, key=lambda h: h[2])[0]
        top_holds += top_dense in holders
        any_holds += bool(holders)
        best = max(h[2] for h in hits)
        for t in temperatures:  # the cepe reader's relevance prior: softmax(cosine / T) over the passages read
            weights = [math.exp((h[2] - best) / t) for h in hits]
            prior_mass[t] += sum(w for w, h in zip(weights, hits) if h[0] in holders) / sum(weights)
        if holders:
            cases.append((row["id"], questions[row["id"]]["question"], answers, passages[holders[0]]))
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "answers.jsonl"
    cache = {}
    if cache_path.exists():
        for r in map(json.loads, cache_path.read_text().splitlines()):
            cache[(r["reader"], r["id"])] = r["prediction"]
    summary = {"questions": len(rows), "top_passage_holds_answer": round(100 * top_holds / len(rows), 1),
               f"top_{args.depth}_hold_answer": round(100 * any_holds / len(rows), 1), "holders_read": len(cases),
               "prior_mass_on_holders": {f"{t:g}": round(100 * m / len(rows), 1) for t, m in prior_mass.items()},
               "readers": {}}
    with cache_path.open("a") as cache_file:
        for name in args.readers.split(","):
            reader = build_reader(spec_for(name), dtype=resolve_dtype(None, "cpu"),
                                  generation=GenerationConfig(max_new_tokens=25))
            em = sub = 0.0
            for qid, question, answers, passage in cases:
                if (name, qid) not in cache:
                    cache[(name, qid)] = postprocess(reader.answer(question, [passage]).text)
                    cache_file.write(json.dumps({"reader": name, "id": qid, "question": question, "answers": answers,
                                                 "passage": passage.id, "prediction": cache[(name, qid)]}) + "\n")
                    cache_file.flush()
                em += exact_match(cache[(name, qid)], answers)
                sub += substring_match(cache[(name, qid)], answers)
            summary["readers"][name] = {"em_reading_holder": round(100 * em / len(cases), 1),
                                        "substring_em_reading_holder": round(100 * sub / len(cases), 1)}
    if args.each:
        summary["each_passage"] = each_passage(args, store, rows, questions)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"{summary['questions']} questions; the top passage by the relevance prior's cosine holds an answer for "
             f"{summary['top_passage_holds_answer']}%, one of the top {args.depth} for "
             f"{summary[f'top_{args.depth}_hold_answer']}%; each reader reads the first holder alone "
             f"({len(cases)} questions). The relevance prior's mean mass on answer-holding passages among the top "
             f"{args.depth}, by temperature: "
             + ", ".join(f"T={t}: {m}%" for t, m in summary["prior_mass_on_holders"].items()) + ".", "",
             "| reader | EM reading the holder alone | substring EM |", "|---|---|---|"]
    lines += [f"| {name} | {r['em_reading_holder']} | {r['substring_em_reading_holder']} |"
              for name, r in summary["readers"].items()]
    if args.each:
        each = summary["each_passage"]
        lines += ["", f"{each['reader']} reading each of the top {args.each} passages alone ({each['questions']} "
                  f"questions): some passage's answer is exactly right for {each['any_exact']}%; a vote over the "
                  f"answers, weighted by the relevance prior (T={args.vote_temperature:g}): {each['prior_vote']}%, "
                  f"counted: {each['count_vote']}%; the retriever's first passage alone: {each['top_passage']}%."]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def vote(said: list[tuple[str, float]], temperature: float) -> str:
    """The answer of (answer, cosine) pairs with the most votes, each weighted by exp((cosine - best) / temperature)
    (an infinite temperature counts them); answers that normalise alike are one; "" when none is said."""
    best = max(cosine for _, cosine in said)
    votes, spelled = defaultdict(float), {}
    for text, cosine in said:
        if key := normalize_answer(text):
            votes[key] += math.exp((cosine - best) / temperature)
            spelled.setdefault(key, text)
    return spelled[max(votes, key=votes.get)] if votes else ""


def each_passage(args, store, rows, questions) -> dict:
    """Strict EM bounds for choosing among the top `args.each` passages, each read alone by the first reader."""
    name = args.readers.split(",")[0]
    cache_path = args.out / "each.jsonl"
    cache = {}
    if cache_path.exists():
        cache = {(r["id"], r["passage"]): r["prediction"] for r in map(json.loads, cache_path.read_text().splitlines())}
    reader = build_reader(spec_for(name), dtype=resolve_dtype(None, "cpu"),
                          generation=GenerationConfig(max_new_tokens=25))
    any_exact = prior_vote = count_vote = top = 0.0
    with cache_path.open("a") as cache_file:
        for row in rows:
            hits = row["hits"][: args.each]
            passages = store.passages([h[0] for h in hits])
            question, answers = questions[row["id"]]["question"], questions[row["id"]]["answers"]
            missing = [h[0] for h in hits if (row["id"], h[0]) not in cache]
            if missing:
                read = reader.answer_batch([question] * len(missing), [[passages[i]] for i in missing])
                for pid, answer in zip(missing, read):
                    cache[(row["id"], pid)] = postprocess(answer.text)
                    cache_file.write(json.dumps({"reader": name, "id": row["id"], "passage": pid,
                                                 "prediction": cache[(row["id"], pid)]}) + "\n")
                cache_file.flush()
            said = [(cache[(row["id"], h[0])], h[2]) for h in hits]
            any_exact += any(exact_match(text, answers) for text, _ in said)
            top += exact_match(said[0][0], answers)
            prior_vote += exact_match(vote(said, args.vote_temperature), answers)
            count_vote += exact_match(vote(said, math.inf), answers)
    n = len(rows)
    return {"reader": name, "depth": args.each, "questions": n, "any_exact": round(100 * any_exact / n, 1),
            "prior_vote": round(100 * prior_vote / n, 1), "count_vote": round(100 * count_vote / n, 1),
            "top_passage": round(100 * top / n, 1)}


if __name__ == "__main__":
    main()
