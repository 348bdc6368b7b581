"""Write the own-documents benchmark (invented entities as Markdown files, NQ-open-format questions).

    python benchmarks/owndocs.py --out runs/owndocs       # or: make owndocs (also builds its index)

Names that occur as words in the demo corpus are never used, so every answer exists only in these files.
"""

from __future__ import annotations

import argparse
import json
import re

from cepe_rag.eval.owndocs import write_benchmark


def demo_corpus_words() -> set[str]:
    from cepe_rag.documents.loading import demo_corpus_path

    articles = json.loads(demo_corpus_path().read_text())
    return {w for a in articles.values() for w in re.findall(r"[a-z]+", f"{a['title']} {a['extract']}".lower())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/owndocs")
    parser.add_argument("--groups", type=int, default=80, help="Invented base names (40%% get a namesake).")
    parser.add_argument("--tune", type=int, default=100, help="Questions in the tuning split.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_benchmark(args.out, n_groups=args.groups, seed=args.seed, n_tune=args.tune,
                             forbidden=demo_corpus_words())
    print(f"{args.out}: {counts['documents']} documents ({counts['namesakes']} near-namesakes), "
          f"{counts['test']} test and {counts['tune']} tuning questions")


if __name__ == "__main__":
    main()
