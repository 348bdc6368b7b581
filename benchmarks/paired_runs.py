"""Paired differences between prediction files of different run folders, at several k, with 95% bootstrap intervals.

    python benchmarks/paired_runs.py runs/owndocs_test_s10/predictions/cepe-extractive_k{k}.jsonl \\
        "session 9=benchmarks/results/owndocs/test_packaged_s9/predictions/cepe_k{k}.jsonl" \\
        "concat=benchmarks/results/owndocs/test/predictions/concat_k{k}.jsonl" --k 1,5,20,50 \\
        --out benchmarks/results/owndocs/test_packaged_s10/paired_differences.md

`{k}` in a path stands for each k. Only questions answered in both files count (a reader run on fewer questions is
compared on those); a missing file is skipped. Substring EM and strict EM, first minus other, in points.
(`paired_comparison.py` does the same within one run folder.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cepe_rag.eval.metrics import paired_bootstrap
from cepe_rag.eval.runner import read_predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mine", help="the predictions compared, a path with {k}")
    parser.add_argument("others", nargs="+", help="NAME=PATH with {k}")
    parser.add_argument("--k", default="1,5,20,50")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args()
    lines = ["| k | metric | against | questions | first | other | difference [95% interval] |",
             "|---|---|---|---|---|---|---|"]
    for k in (int(k) for k in args.k.split(",")):
        mine_path = Path(args.mine.format(k=k))
        if not mine_path.exists():
            continue
        mine = read_predictions(mine_path)
        for metric in ("substring_em", "em"):
            for other in args.others:
                name, _, path = other.partition("=")
                path = Path(path.format(k=k))
                if not path.exists():
                    continue
                theirs = read_predictions(path)
                ids = [i for i in mine if i in theirs]
                if not ids:
                    continue
                first, second = [mine[i][metric] for i in ids], [theirs[i][metric] for i in ids]
                mean, low, high = paired_bootstrap(first, second)
                lines.append(f"| {k} | {metric} | {name} | {len(ids)} | {100 * sum(first) / len(ids):.1f} | "
                             f"{100 * sum(second) / len(ids):.1f} | {mean:+.1f} [{low:+.1f}, {high:+.1f}] |")
    table = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
