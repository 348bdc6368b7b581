"""Position probe (after Liu et al., 2023, "Lost in the Middle"): where among k passages can each reader read?

    python benchmarks/position_probe.py --readers concat,parallel,cepe,cepe-prompt1 --k 1,5,20,50 --limit 60 \\
        --out benchmarks/results/position_probe

For every own-documents question the gold passage (the passage of the question's own file) is placed at rank
r in {first, middle, last} among k passages; the other k - 1 are the passages the retriever finds for the
question with the gold's own document left out, so near-namesakes stay in. `cepe-prompt1` is cepe with the top
passage in the prompt and the rest through the encoder: the gold is then in the encoder whenever r > 1.
Substring EM per (reader, k, r) goes to `--out` as JSON, a table and a plot (position_probe.png); answers are
cached per question, reader and passage list, so a re-run (or a new `--cepe-model`) only answers what is new.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cepe_rag.eval.data import load_questions
from cepe_rag.eval.metrics import postprocess, substring_match
from cepe_rag.indexes import open_store
from cepe_rag.models import resolve_dtype
from cepe_rag.readers import GenerationConfig, build_reader
from cepe_rag.retrieval import Retriever
from cepe_rag.settings import ReaderSpec

POSITIONS = ("first", "middle", "last")


def spec_for(name: str, cepe_model: str | None, relevance_temperature: float | None = None) -> ReaderSpec:
    """read_margin=None: every one of the k placed passages is read (the probe is about k, not the cutoff); passages
    as they are (no sentence focus), as the probe's first rows were read."""
    if name.startswith("cepe"):
        return ReaderSpec(reader="cepe", n_prompt_passages=1 if name == "cepe-prompt1" else 0, cepe_model=cepe_model,
                          read_margin=None, focus=False, relevance_temperature=relevance_temperature)
    return ReaderSpec(reader=name, read_margin=None, focus=False)


def gold_cases(questions_path: str, index: str, limit: int | None, depth: int) -> list[tuple]:
    """(question, gold passage, distractors) for each own-documents question: the gold is the first passage of the
    question's own file; the distractors are the `depth` passages the retriever finds for the question, the gold's
    file left out (so near-namesakes stay in), in their rank order."""
    questions = load_questions(questions_path)[:limit]
    sources = {json.loads(line)["id"]: json.loads(line)["source"]
               for line in Path(questions_path).read_text().splitlines()}
    store = open_store(index)
    found = Retriever(store).retrieve_batch([q.question for q in questions], depth)
    cases = []
    for question, hits in zip(questions, found):
        gold_ids = {int(i) for i in store.matching_ids(f"*/{sources[question.id]}", None)}
        gold = store.passages([min(gold_ids)])[min(gold_ids)]
        cases.append((question, gold, [p for p in hits if p.id not in gold_ids]))
    return cases


def place(gold, distractors: list, k: int, position: str) -> list:
    others = distractors[: k - 1]
    rank = {"first": 0, "middle": len(others) // 2, "last": len(others)}[position]
    return [*others[:rank], gold, *others[rank:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default="runs/owndocs/questions.test.jsonl")
    parser.add_argument("--index", default="indexes/owndocs")
    parser.add_argument("--readers", default="concat,parallel,cepe,cepe-prompt1")
    parser.add_argument("--k", default="1,5,20,50")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--cepe-model", default=None, help="default: the adapter shipped for the decoder")
    parser.add_argument("--relevance-temperature", type=float, default=None,
                        help="the cepe rows' relevance prior (default: the checkpoint's own)")
    parser.add_argument("--label", default="", help="suffix of the cepe rows' names (e.g. the adapter's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    cases = gold_cases(args.questions, args.index, args.limit or None, max(ks) + 10)
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "answers.jsonl"
    answers = {}
    if cache_path.exists():
        for line in cache_path.read_text().splitlines():
            r = json.loads(line)
            answers[(r["reader"], r["id"], tuple(r["passages"]))] = r["prediction"]
    generation = GenerationConfig(max_new_tokens=25, stop_strings=("\n",))
    rows = []
    with cache_path.open("a") as cache:
        for name in args.readers.split(","):
            label = name + (args.label if name.startswith("cepe") else "")
            spec = spec_for(name, args.cepe_model, args.relevance_temperature)
            reader = build_reader(spec, dtype=resolve_dtype(None, "cpu"), generation=generation)
            for k in ks:
                for position in POSITIONS if k > 1 else POSITIONS[:1]:
                    correct = []
                    for question, gold, distractors in cases:
                        passages = place(gold, distractors, k, position)
                        key = (label, question.id, tuple(p.id for p in passages))
                        if key not in answers:
                            answers[key] = postprocess(reader.answer(question.question, passages).text)
                            cache.write(json.dumps({"reader": label, "id": question.id, "passages": list(key[2]),
                                                    "prediction": answers[key]}) + "\n")
                            cache.flush()
                        correct.append(substring_match(answers[key], question.answers))
                    rows.append({"reader": label, "k": k, "position": position, "n": len(correct),
                                 "substring_em": round(100 * sum(correct) / len(correct), 1)})
                    print(json.dumps(rows[-1]), flush=True)
    summary_path = args.out / "position_probe.json"
    earlier = json.loads(summary_path.read_text()) if summary_path.exists() else []
    done = {(r["reader"], r["k"], r["position"]) for r in rows}
    rows = [r for r in earlier if (r["reader"], r["k"], r["position"]) not in done] + rows
    summary_path.write_text(json.dumps(rows, indent=2) + "\n")
    write_table(rows, args.out / "position_probe.md", ks)
    plot(rows, args.out / "position_probe.png", ks)


def write_table(rows: list[dict], path: Path, ks: list[int]) -> None:
    readers = list(dict.fromkeys(r["reader"] for r in rows))
    cell = {(r["reader"], r["k"], r["position"]): r["substring_em"] for r in rows}
    columns = [(k, p) for k in ks for p in (POSITIONS if k > 1 else POSITIONS[:1])]
    lines = ["| reader | " + " | ".join(f"k={k} {p}" if k > 1 else "k=1" for k, p in columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(str(cell.get((name, k, p), "")) for k, p in columns) + " |"
              for name in readers]
    n = max(r["n"] for r in rows)
    path.write_text(f"Substring EM (%), {n} own-documents questions; gold passage at rank first / middle / last.\n\n"
                    + "\n".join(lines) + "\n")
    print(path.read_text())


def plot(rows: list[dict], path: Path, ks: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readers = list(dict.fromkeys(r["reader"] for r in rows))
    figure, axes = plt.subplots(1, len(POSITIONS), figsize=(12, 3.8), sharey=True)
    for axis, position in zip(axes, POSITIONS):
        for name in readers:
            points = [(r["k"], r["substring_em"]) for r in rows if r["reader"] == name and
                      (r["position"] == position or r["k"] == 1)]
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        axis.set_xscale("log")
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_title(f"gold passage {position}")
        axis.set_xlabel("passages read (k)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("substring EM (%)")
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
