"""Paired differences between readers of one eval run folder, with 95% bootstrap intervals.

    python benchmarks/paired_comparison.py runs/nq500 parallel_k20:closed-book_k0 parallel_k5:concat_k5

Each pair is two prediction files (predictions/NAME.jsonl); only questions answered in both count.
--answer-retrieved keeps the questions whose gold answer is in the first reader's passages (recall 1):
"does reading the passages beat what the decoder knows?", asked where reading could help.
Prints a Markdown table per metric difference (first - second, in points); JSON with --json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cepe_rag.eval.metrics import paired_bootstrap
from cepe_rag.eval.runner import read_predictions


def load(folder: Path, name: str) -> dict[str, dict]:
    path = folder / "predictions" / f"{name}.jsonl"
    if not path.exists():
        raise SystemExit(f"error: no predictions file {path}")
    return read_predictions(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("pairs", nargs="+", help="FIRST:SECOND prediction file names, e.g. parallel_k20:concat_k20")
    parser.add_argument("--metrics", default="substring_em,f1,em")
    parser.add_argument("--answer-retrieved", action="store_true",
                        help="only questions with a gold answer in the first reader's passages")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    rows = []
    for pair in args.pairs:
        first_name, _, second_name = pair.partition(":")
        first, second = load(args.folder, first_name), load(args.folder, second_name)
        shared = sorted(i for i in first.keys() & second.keys() if first[i]["recall"] or not args.answer_retrieved)
        row = {"first": first_name, "second": second_name, "n": len(shared)}
        for metric in metrics:
            row[metric] = paired_bootstrap([first[i][metric] for i in shared], [second[i][metric] for i in shared])
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| first | second | n | " + " | ".join(f"Δ {m} (95% CI)" for m in metrics) + " |")
    print("|---|---|---|" + "---|" * len(metrics))
    for row in rows:
        cells = [f"{row[m][0]:+.1f} [{row[m][1]:+.1f}, {row[m][2]:+.1f}]" for m in metrics]
        print(f"| {row['first']} | {row['second']} | {row['n']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
